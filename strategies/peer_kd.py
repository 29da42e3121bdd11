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
sampled neighbour only trains on its own data.

``shared_data: generated`` needs no public data: each peer keeps a data-free conditional
generator (:class:`fedkd.synthesis.Generator`, persistent across rounds as FedFTG's) and,
after its local training, trains it for ``gen_steps`` Adam steps against its own model,
``CE(model(G(z, y)), y) + lambda_bn * L_bn + lambda_div * L_div`` with ``y`` uniform over the
classes (DENSE's and DeepInversion's objective without the adversarial term, as there is no
student yet: the BatchNorm-statistics prior counts for models with BatchNorm), then draws its
shared batch of ``public_size`` samples. The batch crosses the peer's edges; each neighbour
labels it (``query.peer_kd_label``: its logits cross back); the peer distils from the weighted
ensemble of those labels on its own batch. The labels ``y`` the batch was drawn for are the
diagnostics' truth (source ``generated``). Each directed edge ``s -> d`` then carries ``s``'s
batch and ``s``'s logits on ``d``'s batch: ``edges.parquet`` gives their serialized size as
decoded (a codec's compression of the batch is in ``bytes_up``, not in the edge bytes).

Messages go through the Flower grid (the server relays each peer's target, built only from
its neighbours' logits); :attr:`strategies.peers.GraphPeers.edge_log` records every edge a
peer's logits crossed (``edges.parquet``), and the records carry the graph's spectral gap and
the peers' consensus (:mod:`strategies.peers`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedkd.client import ClientEnv, client_fn, seed_for
from fedkd.comm import array_bytes
from fedkd.diagnostics import Diagnosis, diagnose, mean_summary
from fedkd.distill import diversity_loss
from fedkd.errors import ScenarioError
from fedkd.synthesis import BatchNormPrior, Generator, reset_generator, value_range
from fedkd.train import batch_indices, fit, predict, sgd, train_supervised
from fedkd.world import World
from strategies import STRATEGIES
from strategies.dml import DML, peer_kl, peer_target
from strategies.fedavg import NodeInfo
from strategies.fedmd import (
    alignment_inputs,
    check_positive,
    logits_record,
    peer_context,
    query_logits,
    record_logits,
    split_logits,
)
from strategies.local import check_int
from strategies.peers import GraphPeers, with_local_loss
from strategies.weighting import (
    uses_labels,
    weighting_split,
)

QUERY_TYPE = f"{MessageType.QUERY}.peer_kd_local"
GENERATE_TYPE = f"{MessageType.QUERY}.peer_kd_generate"
LABEL_TYPE = f"{MessageType.QUERY}.peer_kd_label"
TRAIN_TYPE = f"{MessageType.TRAIN}.peer_kd"
SHARED_DATA = ("public", "generated")


@functools.lru_cache(maxsize=64)
def npy_bytes(shape: tuple[int, ...]) -> int:
    """Serialized size of a float32 array of ``shape`` in a Flower message."""
    return array_bytes(ArrayRecord({"a": Array(np.zeros(shape, dtype=np.float32))}))


#: State-store keys of a peer's generator and of its generated batch of the round.
GENERATOR_KEY, SHARED_KEY = "generator", "shared"


def made_batch(reply: Message) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``generated`` peer's batch, the labels it was drawn for and its own logits on it."""
    rec = reply.content.array_records["inputs"]
    return (torch.from_numpy(np.array(rec["x"].numpy(), dtype=np.float32)),
            torch.from_numpy(np.array(rec["y"].numpy(), dtype=np.int64)),
            record_logits(reply.content.array_records["logits"]))


def generated_edge_bytes(nbrs: Mapping[int, Sequence[int]],
                         batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                         labelled: Mapping[int, torch.Tensor], at: Mapping[int, int],
                         ) -> dict[tuple[int, int], int]:
    """Bytes of each directed edge ``s -> d`` of a ``generated`` round: ``s``'s batch and,
    when ``s`` labelled, its logits on ``d``'s batch (serialized float32 arrays)."""
    sizes = {}
    for d, sources in nbrs.items():
        n = len(batches[at[d]][0])
        for s in sources:
            sizes[(s, d)] = npy_bytes(tuple(batches[at[s]][0].shape)) + (
                npy_bytes((n, labelled[s].shape[1])) if s in labelled else 0)
    return sizes


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
        What the peers predict on: ``"public"`` (a seeded public subset each round) or
        ``"generated"`` (each peer's generated batch; image data).
    public_size : int
        Shared samples per round (capped at the public split; the generated batch's size).
    distill_epochs : int
        Epochs over the shared batch in the distillation step.
    temperature, kl_weight, weighting, weighting_params, peer_ensemble
        As :class:`strategies.dml.DML`; the weighting combines each peer's neighbours.
    gen_steps, gen_lr, noise_dim, gen_width, lambda_bn, lambda_div
        ``generated`` only: the generator's Adam steps per round and learning rate, noise
        width, base channels, and the weights of its BatchNorm prior and diversity terms.
    """

    train_type = TRAIN_TYPE
    query_type = QUERY_TYPE
    name = "peer_kd"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0,
                 topology: dict[str, Any] | None = None,
                 shared_data: Literal["public", "generated"] = "public", public_size: int = 500,
                 distill_epochs: int = 1, temperature: float = 1.0, kl_weight: float = 1.0,
                 weighting: str = "uniform", weighting_params: dict[str, Any] | None = None,
                 peer_ensemble: Literal["probs", "logits"] = "probs", gen_steps: int = 20,
                 gen_lr: float = 1e-3, noise_dim: int = 32, gen_width: int = 16,
                 lambda_bn: float = 1.0, lambda_div: float = 1.0) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         public_size=public_size, temperature=temperature,
                         kl_weight=kl_weight, weighting=weighting,
                         weighting_params=weighting_params, peer_ensemble=peer_ensemble)
        if shared_data not in SHARED_DATA:
            raise ScenarioError("strategy.params.shared_data", shared_data,
                                f"one of {list(SHARED_DATA)}")
        check_int("strategy.params.distill_epochs", distill_epochs, 1)
        check_int("strategy.params.gen_steps", gen_steps, 0)
        for name, value in (("gen_lr", gen_lr), ("noise_dim", noise_dim),
                            ("gen_width", gen_width)):
            check_positive(f"strategy.params.{name}", value)
        for name, value in (("lambda_bn", lambda_bn), ("lambda_div", lambda_div)):
            if value < 0:
                raise ScenarioError(f"strategy.params.{name}", value, "a number >= 0")
        self.shared_data = shared_data
        self.distill_epochs = distill_epochs
        self.generator = {"gen-steps": gen_steps, "gen-lr": gen_lr, "noise-dim": noise_dim,
                          "gen-width": gen_width, "lambda-bn": lambda_bn,
                          "lambda-div": lambda_div}
        self.init_graph(topology)

    def bind(self, world: World) -> None:
        """Bind the world (DML's checks) and build the graph over its clients."""
        super().bind(world)
        self.bind_graph(world)

    def require_shared(self, world: World) -> None:
        """``public``: DML's public split; ``generated``: image data."""
        if self.shared_data == "public":
            super().require_shared(world)
        elif len(world.data.input_shape) != 3:
            raise ScenarioError("strategy.params.shared_data", self.shared_data,
                                "public (generated needs image data, shape (C, H, W); "
                                f"{world.scenario.data.name} is "
                                f"{tuple(world.data.input_shape)})")

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """DML's round config, the distillation epochs and (``generated``) the generator's."""
        extra = self.generator if self.shared_data == "generated" else {}
        return ConfigRecord({**dict(super().round_config(server_round, config)),
                             "distill-epochs": self.distill_epochs,
                             "shared-data": self.shared_data, **extra})

    def teachers(self, server_round: int, peers: Sequence[NodeInfo]) -> torch.Tensor:
        """Each peer's teachers: its sampled neighbours on the round's graph."""
        return self.teacher_mask(server_round, peers)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """``public``: DML's round over the graph. ``generated``: the peers train and draw
        their batches, neighbours label them, each peer gets its neighbours' ensemble."""
        if self.shared_data == "public":
            return super().configure_train(server_round, arrays, config, grid)
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        self.plan_round(server_round, nodes, grid)
        cfg = self.round_config(server_round, config)
        made = query_logits(grid, nodes, cfg, GENERATE_TYPE, server_round)
        if not made:
            return []
        peers = [self.node(r.metadata.src_node_id) for r in made]
        nbrs = self.neighbourhoods(server_round, peers)
        at = {p.cid: i for i, p in enumerate(peers)}
        batches = [made_batch(r) for r in made]
        asks = [Message(RecordDict({"config": cfg, "inputs": ArrayRecord({"x": Array(
            torch.cat([batches[at[s]][0] for s in nbrs[p.cid]]).numpy())})}),
            dst_node_id=p.node_id, message_type=LABEL_TYPE, group_id=str(server_round))
            for p in peers if nbrs[p.cid]]
        labelled = {self.node(r.metadata.src_node_id).cid: record_logits(
            r.content.array_records["logits"]) for r in grid.send_and_receive(asks)
            if not r.has_error()}
        n = len(batches[0][0])
        targets: list[torch.Tensor | None] = []
        parts, rows = [], []
        for p, (_, y, own) in zip(peers, batches, strict=True):
            teachers = [s for s in nbrs[p.cid] if s in labelled]
            if not teachers:
                targets.append(None)
                continue
            logits = torch.stack([labelled[s][nbrs[s].index(p.cid) * n:][:n] for s in teachers])
            ctx = replace(peer_context(self.world, [peers[at[s]] for s in teachers],
                                       [made[at[s]] for s in teachers], self.weigh, y),
                          student=p.cid, student_logits=own)
            target, w = peer_target(logits, self.weigh, ctx, None, self.peer_ensemble,
                                    self.temperature)
            targets.append(target)
            rows += [(s, float(ws)) for s, ws in zip(teachers, w.mean(dim=0), strict=True)]
            if self.teacher_log.enabled:
                parts.append(diagnose(logits, w, teachers, y, ensemble=self.peer_ensemble,
                                      source="generated", per_class=False).summary)
        self.edge_sizes[server_round] = generated_edge_bytes(nbrs, batches, labelled, at)
        self.log_generated(server_round, rows, parts)
        return [self.peer_message(p, t, cfg, server_round, r)
                for p, t, r in zip(peers, targets, made, strict=True)]

    def log_generated(self, server_round: int, rows: Sequence[tuple[int, float]],
                      parts: Sequence[dict[str, float]]) -> None:
        """Teacher rows (each teacher's mean weight over its students) and the diagnostics
        averaged over the peers' ensembles."""
        weights: dict[int, list[float]] = {}
        for cid, w in rows:
            weights.setdefault(cid, []).append(w)
        teacher = [{"client": c, "class": -1, "weight": sum(ws) / len(ws), "acc": None,
                    "source": "generated"} for c, ws in sorted(weights.items())]
        self.teacher_log.add(server_round, Diagnosis(mean_summary(list(parts)) if parts
                                                     else {}, teacher))

    def edge_price(self, node: NodeInfo, grid: Grid) -> int:
        """``generated``: the float32 batch and logits (:meth:`payload_prior`); ``public``:
        the peer's last encoded upload of logits."""
        if self.shared_data == "generated":
            return self.payload_prior(node)
        return GraphPeers.edge_price(self, node, grid)

    def payload_prior(self, node: NodeInfo) -> int:
        """Float32 logits on the shared batch (and, ``generated``, the batch itself; with a
        label-using weighting, the logits on the weighting split the upload also carries)."""
        assert self.world is not None
        data, classes = self.world.data, self.world.data.num_classes
        n = (self.public_size if self.shared_data == "generated" or data.public is None
             else min(self.public_size, len(data.public)))
        size = npy_bytes((n, classes))
        if self.shared_data == "generated":
            size += npy_bytes((n, *data.input_shape))
        split = weighting_split(data)[0] if uses_labels(self.weigh) else None
        return size + (npy_bytes((len(split), classes)) if split is not None else 0)

    def peer_message(self, node: NodeInfo, target: torch.Tensor | None, cfg: ConfigRecord,
                     server_round: int, reply: Message | None = None) -> Message:
        """DML's message, its config also carrying the peer's own local training loss."""
        msg = super().peer_message(node, target, cfg, server_round, reply)
        if reply is not None:
            msg.content["config"] = with_local_loss(cfg, reply)
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


@client_fn(GENERATE_TYPE)
def peer_kd_generate(msg: Message, env: ClientEnv) -> RecordDict:
    """Train the private model on private data, then the peer's generator against it; keep
    both and the drawn batch; reply the batch, its labels and the model's logits on it."""
    model, _ = env.private_model()
    result = train_supervised(model, env.data.x, env.data.y, env.train_config, seed=env.seed())
    env.save_private(model)
    x, y = synthesise(model, env)
    env.store.save(env.cid, SHARED_KEY, {"x": x, "y": y})
    return RecordDict({"inputs": ArrayRecord({"x": Array(x.numpy()), "y": Array(y.numpy())}),
                       "logits": logits_record(predict(model, x)),
                       **split_logits(model, env),
                       "metrics": MetricRecord({"num-examples": len(env.data),
                                                "train-loss": result.loss})})


@client_fn(LABEL_TYPE)
def peer_kd_label(msg: Message, env: ClientEnv) -> RecordDict:
    """This peer's logits on its neighbours' generated batches (stacked)."""
    model, _ = env.private_model()
    x = torch.from_numpy(msg.content.array_records["inputs"]["x"].numpy())
    return RecordDict({"logits": logits_record(predict(model, x))})


def synthesise(model: torch.nn.Module, env: ClientEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """Train this peer's persistent generator against its model, then draw the round's batch.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``subset-size`` generated inputs (CPU) and the labels they were drawn for.
    """
    cfg = env.config
    classes = env.world.data.num_classes
    noise = int(cfg["noise-dim"])
    low, high = value_range(env.data.x)
    gen = Generator(noise, env.data.x.shape[1:], low, high, num_classes=classes,
                    width=int(cfg["gen-width"]))
    state = env.store.load(env.cid, GENERATOR_KEY)
    if state is None:
        reset_generator(gen, seed_for(int(cfg.get("seed", 0)), env.cid, 31))
    else:
        gen.load_state_dict(state)
    gen.to(env.device).train()
    model.eval().requires_grad_(False)
    opt = torch.optim.Adam(gen.parameters(), lr=float(cfg["gen-lr"]))
    rng = torch.Generator().manual_seed(env.seed(30))
    batch = env.train_config.batch_size
    with BatchNormPrior([model]) as prior:
        for _ in range(int(cfg["gen-steps"])):
            z = torch.randn(batch, noise, generator=rng).to(env.device)
            y = torch.randint(classes, (batch,), generator=rng).to(env.device)
            x = gen(z, y)
            loss = (F.cross_entropy(model(x), y) + float(cfg["lambda-bn"]) * prior.loss
                    + float(cfg["lambda-div"]) * diversity_loss(z, x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.requires_grad_(True)
    env.store.save(env.cid, GENERATOR_KEY, gen.state_dict())
    gen.eval()
    n = int(cfg["subset-size"])
    with torch.no_grad():
        z = torch.randn(n, noise, generator=rng).to(env.device)
        y = torch.randint(classes, (n,), generator=rng)
        x = gen(z, y.to(env.device)).cpu()
    return x, y


def shared_inputs(env: ClientEnv) -> torch.Tensor:
    """The round's shared batch: the public subset, or the batch this peer generated."""
    if env.config.get("shared-data", "public") == "generated":
        saved = env.store.load(env.cid, SHARED_KEY)
        assert saved is not None, "the generated batch is drawn before the distillation"
        return saved["x"]
    return alignment_inputs(env)


@client_fn(TRAIN_TYPE)
def peer_kd_distil(msg: Message, env: ClientEnv) -> RecordDict:
    """Distil the private model from the neighbours' target on the shared batch, keep it."""
    kl_loss = 0.0
    if "peers" in msg.content.array_records:
        model, _ = env.private_model()
        x_pub = shared_inputs(env).to(env.device)
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
