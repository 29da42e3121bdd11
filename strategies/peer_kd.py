"""Decentralized peer distillation over a communication graph.

Online distillation among peers without a central model, in the line of deep mutual learning
(Zhang et al., CVPR 2018) run over a graph as in decentralized/gossip knowledge distillation
(e.g. Li et al., "Decentralized federated learning via mutual knowledge transfer", IEEE IoT-J
2021; Bistritz et al., "Distributed distillation for on-device learning", NeurIPS 2020): each
peer keeps its own (possibly heterogeneous) model, and only predictions cross the edges.

Each round, every sampled peer

1. trains its private model on its own data for the scenario's local epochs
   (``query.peer_kd_local``), then predicts the round's shared batch -- a seeded subset of the
   public split, ``public_size`` samples (only its seed and size travel) -- and sends those
   logits (one ``N x C`` float32 array) along its edges;
2. receives the weighted ensemble of its *sampled neighbours'* predictions (the teacher
   weighting plug applied per neighbourhood, :func:`strategies.dml.leave_one_out` with the
   graph's mask) and distils from it on the shared batch (``train.peer_kd``) for
   ``distill_epochs`` epochs of SGD with the scenario's batch size and learning rate::

       loss = kl_weight * T² * KL(q_k ‖ softmax(model(x_pub) / T)),  batchmean,

   ``q_k = sum_{l in N(k)} w_k[n, l] softmax(logits_l / T)`` detached (``peer_ensemble:
   probs``, DML's ensemble of the others) or ``softmax(sum_l w_k[n, l] logits_l / T)``
   (``logits``).

On a complete graph with every peer sampled the neighbours are DML's "other peers", and the
targets are exactly DML's (a test pins it); what differs from :mod:`strategies.dml` is the
order inside a round (train on private data, then distil, as the decentralized-KD papers do,
instead of one joint objective) and that a peer hears only its neighbours. A peer with no
sampled neighbour only trains on its own data. ``shared_data: public`` is the only shared
batch built: a data-free generator per peer (``generated``) is not.

Messages go through the Flower grid (the server relays each peer's target, built only from
its neighbours' logits); :attr:`strategies.peers.GraphPeers.edge_log` records every edge a
peer's logits crossed (``edges.parquet``), and the records carry the graph's spectral gap and
the peers' consensus (:mod:`strategies.peers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedkd.client import ClientEnv, client_fn
from fedkd.errors import ScenarioError
from fedkd.train import batch_indices, fit, predict, sgd, train_supervised
from fedkd.world import World
from strategies import STRATEGIES
from strategies.dml import DML, peer_kl
from strategies.fedavg import NodeInfo
from strategies.fedmd import alignment_inputs, logits_record, record_logits, split_logits
from strategies.local import check_int
from strategies.peers import GraphPeers

QUERY_TYPE = f"{MessageType.QUERY}.peer_kd_local"
TRAIN_TYPE = f"{MessageType.TRAIN}.peer_kd"
SHARED_DATA = ("public",)


@STRATEGIES.register("peer_kd")
class PeerKD(GraphPeers, DML):
    """Peers train on their own data, then distil from their graph neighbours' predictions.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed
        Participation and seeding (from the scenario).
    topology : dict, optional
        ``{name, params}`` of a registered topology (:mod:`strategies.topology`); complete by
        default.
    shared_data : str
        What the peers predict on: ``"public"`` (a seeded public subset each round).
    public_size : int
        Shared samples per round (capped at the public split).
    distill_epochs : int
        Epochs over the shared batch in the distillation step.
    temperature, kl_weight, weighting, weighting_params, peer_ensemble
        As :class:`strategies.dml.DML`; the weighting combines each peer's neighbours.
    """

    train_type = TRAIN_TYPE
    query_type = QUERY_TYPE

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0,
                 topology: dict[str, Any] | None = None,
                 shared_data: Literal["public"] = "public", public_size: int = 500,
                 distill_epochs: int = 1, temperature: float = 1.0, kl_weight: float = 1.0,
                 weighting: str = "uniform", weighting_params: dict[str, Any] | None = None,
                 peer_ensemble: Literal["probs", "logits"] = "probs") -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         public_size=public_size, temperature=temperature,
                         kl_weight=kl_weight, weighting=weighting,
                         weighting_params=weighting_params, peer_ensemble=peer_ensemble)
        if shared_data not in SHARED_DATA:
            raise ScenarioError("strategy.params.shared_data", shared_data,
                                f"one of {list(SHARED_DATA)}")
        check_int("strategy.params.distill_epochs", distill_epochs, 1)
        self.shared_data = shared_data
        self.distill_epochs = distill_epochs
        self.init_graph(topology)

    def bind(self, world: World) -> None:
        """Bind the world and build the graph over its clients."""
        super().bind(world)
        self.bind_graph(world)

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """DML's round config and the distillation epochs."""
        return ConfigRecord({**dict(super().round_config(server_round, config)),
                             "distill-epochs": self.distill_epochs})

    def teachers(self, server_round: int, peers: Sequence[NodeInfo]) -> torch.Tensor:
        """Each peer's teachers: its sampled neighbours on the round's graph."""
        return self.teacher_mask(server_round, peers)

    def peer_message(self, node: NodeInfo, target: torch.Tensor | None, cfg: ConfigRecord,
                     server_round: int, reply: Message | None = None) -> Message:
        """DML's message, its config also carrying the peer's own local training loss."""
        msg = super().peer_message(node, target, cfg, server_round, reply)
        if reply is not None:
            loss = reply.content.metric_records["metrics"]["train-loss"]
            msg.content["config"] = ConfigRecord({**dict(cfg), "local-loss": loss})
        return msg


# ----------------------------------------------------------------------------- client side
@client_fn(QUERY_TYPE)
def peer_kd_local(msg: Message, env: ClientEnv) -> RecordDict:
    """Train the private model on private data, keep it, reply its logits on the shared batch."""
    model, _ = env.private_model()
    result = train_supervised(model, env.data.x, env.data.y, env.train_config, seed=env.seed())
    env.save_private(model)
    return RecordDict({"logits": logits_record(predict(model, alignment_inputs(env))),
                       **split_logits(model, env),
                       "metrics": MetricRecord({"num-examples": len(env.data),
                                                "train-loss": result.loss})})


@client_fn(TRAIN_TYPE)
def peer_kd_distil(msg: Message, env: ClientEnv) -> RecordDict:
    """Distil the private model from the neighbours' target on the shared batch, keep it."""
    kl_loss = 0.0
    if "peers" in msg.content.array_records:
        model, _ = env.private_model()
        x_pub = alignment_inputs(env).to(env.device)
        target = record_logits(msg.content.array_records["peers"]).to(env.device)
        temperature = float(env.config["temperature"])
        weight = float(env.config["kl-weight"])
        ensemble = str(env.config["peer-ensemble"])
        gen = torch.Generator().manual_seed(env.seed(21))
        batches = batch_indices(len(x_pub), env.train_config.batch_size, gen,
                                epochs=int(env.config["distill-epochs"]))
        kl_loss = fit(model, sgd(model, env.train_config), batches,
                      lambda idx: weight * peer_kl(model(x_pub[idx]), target[idx],
                                                   temperature, ensemble)).loss
        env.save_private(model)
    return RecordDict({"metrics": MetricRecord({
        "num-examples": len(env.data), "train-loss": float(env.config.get("local-loss", 0.0)),
        "kl-loss": kl_loss})})
