"""Decentralized parallel SGD: gossip averaging of weights with graph neighbours.

Lian, Zhang, Zhang, Hsieh, Zhang & Liu, "Can Decentralized Algorithms Outperform Centralized
Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient Descent", NeurIPS 2017.
The baseline of :mod:`strategies.peer_kd` for homogeneous models: no central model, each peer
keeps its own weights ``x_i`` and averages them with its neighbours' through a symmetric doubly
stochastic mixing matrix ``W`` (Metropolis-Hastings weights of the round's graph among the
sampled peers, :func:`strategies.topology.metropolis_weights`).

Each round, every sampled peer

1. runs the scenario's local epochs of SGD on its own data from its current weights
   (``query.dpsgd_local``) and sends the result along its edges;
2. replaces its weights by the mix ``x_i <- sum_j W_ij x_j`` over itself and its sampled
   neighbours (``train.dpsgd``), accumulated in float64 as FedAvg's mean.

All peers start from the group's global initial model (the paper's common ``x_0``). Where
fedkd differs from the paper: the paper takes one stochastic gradient per gossip step
(``x_i <- sum_j W_ij x_j - gamma g_i(x_i)``); here a peer runs its local epochs between two
gossip steps (local SGD then gossip, the "local updates" form of the unified analysis of
Koloskova et al., ICML 2020), so one round of D-PSGD is one round of FedAvg in cost and, on a
complete graph with every peer sampled (``W = 1/K``) and equal data sizes, in result: the
peers' weights after the mix are FedAvg's global model (a test pins it). FedAvg weights by
data size, the Metropolis matrix does not.

The server only relays: peer ``i`` receives its mix, built from the weights of ``i``'s
neighbours; :attr:`strategies.peers.GraphPeers.edge_log` records the edges every upload crossed
(``edges.parquet``). Accuracy is the peers' mean test accuracy (``evaluate.private``), with
their consensus and the graph's spectral gap (:mod:`strategies.peers`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedkd.client import ClientEnv, client_fn, train_and_reply
from fedkd.comm import array_bytes, state_dict_to_arrayrecord
from fedkd.errors import ScenarioError
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import NodeInfo, weighted_average
from strategies.fedmd import query_logits
from strategies.local import Local
from strategies.peers import GraphPeers, with_local_loss
from strategies.topology import metropolis_weights

QUERY_TYPE = f"{MessageType.QUERY}.dpsgd_local"
TRAIN_TYPE = f"{MessageType.TRAIN}.dpsgd"


@STRATEGIES.register("dpsgd")
class DPSGD(GraphPeers, Local):
    """Peers train locally, then average their weights with their graph neighbours.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed
        Participation and seeding (from the scenario).
    topology : dict, optional
        ``{name, params}`` of a registered topology (:mod:`strategies.topology`); complete by
        default.
    """

    train_type = TRAIN_TYPE
    query_type = QUERY_TYPE

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0,
                 topology: dict[str, Any] | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed)
        self.init_graph(topology)
        self._model_bytes: int | None = None

    def bind(self, world: World) -> None:
        """Bind the world; gossip averaging needs one architecture."""
        if len(world.groups) != 1:
            raise ScenarioError("clients.models", list(world.groups),
                                "one architecture (dpsgd averages weights; peer_kd mixes "
                                "heterogeneous models)")
        super().bind(world)
        self.bind_graph(world)

    def payload_prior(self, node: NodeInfo) -> int:
        """The model's float32 weights (one architecture)."""
        assert self.world is not None
        if self._model_bytes is None:
            model = self.world.new_model(node.arch, seed=0)
            self._model_bytes = array_bytes(state_dict_to_arrayrecord(model.state_dict()))
        return self._model_bytes

    def client_config(self, server_round: int) -> dict[str, Any]:
        """Every peer starts from the group's global initial model."""
        return {"common-init": 1}

    def private_eval_config(self) -> dict[str, Any]:
        """The common init (for never-sampled peers) and the test-set predictions."""
        return {**super().private_eval_config(), "common-init": 1}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Collect the peers' locally trained weights; send each peer its neighbourhood mix."""
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        self.plan_round(server_round, nodes, grid)
        cfg = ConfigRecord({**dict(config), "server-round": server_round,
                            **self.client_config(server_round)})
        replies = query_logits(grid, nodes, cfg, QUERY_TYPE, server_round)
        if not replies:
            return []
        peers = [self.node(r.metadata.src_node_id) for r in replies]
        self.neighbourhoods(server_round, peers)  # logs the round's edges
        w = metropolis_weights(self.round_graph(server_round), [p.cid for p in peers])
        records = [r.content.array_records["arrays"] for r in replies]
        out = []
        for i, (node, reply) in enumerate(zip(peers, replies, strict=True)):
            mixed = [j for j in range(len(peers)) if w[i, j] > 0]
            mix = weighted_average([records[j] for j in mixed], [w[i, j] for j in mixed])
            out.append(Message(RecordDict({"arrays": mix,
                                           "config": with_local_loss(cfg, reply)}),
                               dst_node_id=node.node_id, message_type=self.train_type,
                               group_id=str(server_round)))
        return out


# ----------------------------------------------------------------------------- client side
@client_fn(QUERY_TYPE)
def dpsgd_local(msg: Message, env: ClientEnv) -> RecordDict:
    """Local SGD from this peer's current weights; reply the trained weights."""
    model, _ = env.private_model()
    return train_and_reply(model, env)


@client_fn(TRAIN_TYPE)
def dpsgd_mix(msg: Message, env: ClientEnv) -> RecordDict:
    """Keep the neighbourhood mix as this peer's weights (the stored ones are replaced, so
    they are not loaded)."""
    env.save_private(env.model_from(msg.content.array_records["arrays"]))
    return RecordDict({"metrics": MetricRecord({
        "num-examples": len(env.data), "train-loss": float(env.config["local-loss"])})})
