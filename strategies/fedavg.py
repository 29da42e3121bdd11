"""FedAvg: Communication-Efficient Learning of Deep Networks from Decentralized Data.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, AISTATS 2017.

Flower's message-API ``FedAvg`` with what a simulator needs and every fedkd strategy inherits:

- a one-off handshake (``query.hello``) that learns each node's partition id, architecture,
  data size and label counts, so sampling is seeded over partition ids and reproducible on any
  engine;
- heterogeneous model groups: the global ``ArrayRecord`` holds one model per architecture with
  keys ``"<arch>.<param>"``; each client receives its group's model and the server averages
  per group (weighted by ``num-examples``), keeping integer buffers' dtypes.

In a plain Flower app, whose ClientApp does not answer ``query.hello``, every strategy falls
back to Flower's own behaviour: node ids are sampled with the strategy's seed, replies are
weighted by their ``num-examples`` metric, and the global ``ArrayRecord`` is one model with
the model's own keys (:attr:`FedAvg.plain`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedkd.comm import as_numpy, join_groups, split_groups, state_dict_to_arrayrecord
from fedkd.diagnostics import TeacherLog
from fedkd.world import World
from strategies import STRATEGIES


@dataclass(frozen=True)
class NodeInfo:
    """What the handshake tells the server about one node."""

    node_id: int
    cid: int
    arch: str
    num_examples: int
    label_counts: tuple[int, ...]


#: The architecture of every node of a plain Flower app (one model, keys not prefixed).
PLAIN_ARCH = ""


def num_examples(reply: Message, key: str = "num-examples") -> float:
    """The ``num-examples`` a reply reports, in whichever MetricRecord holds it."""
    for record in reply.content.metric_records.values():
        if key in record:
            return float(record[key])  # type: ignore[arg-type]
    raise ValueError(f"reply from node {reply.metadata.src_node_id} reports no {key!r}")


def weighted_average(records: Sequence[ArrayRecord], weights: Sequence[float]) -> ArrayRecord:
    """Weighted mean of ArrayRecords with identical keys, accumulated in float64.

    Each result keeps its input's dtype (integer buffers such as BatchNorm's
    ``num_batches_tracked`` are rounded back to integers).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out: dict[str, Array] = {}
    for key in records[0]:
        first = as_numpy(records[0][key])
        acc = np.zeros(first.shape, dtype=np.float64)
        for rec, wi in zip(records, w, strict=True):
            acc += wi * as_numpy(rec[key])
        if np.issubdtype(first.dtype, np.integer):
            acc = np.rint(acc)
        out[key] = Array(np.asarray(acc, dtype=first.dtype))
    return ArrayRecord(out)


@STRATEGIES.register("fedavg")
class FedAvg(FlowerFedAvg):
    """Federated averaging with seeded sampling and per-architecture groups.

    Parameters
    ----------
    fraction_train : float
        Fraction of clients sampled per round.
    min_train_nodes : int
        Minimum number of clients per round.
    min_available_nodes : int
        Nodes to wait for before the handshake.
    seed : int
        Seeds client sampling (with the round number).
    fraction_evaluate : float
        Fraction of clients running federated evaluation (0 disables it; fedkd evaluates
        the global model centrally on the test set).
    """

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0,
                 fraction_evaluate: float = 0.0) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
                         min_available_nodes=min_available_nodes)
        self.seed = seed
        self.plain = False
        self.nodes: list[NodeInfo] = []
        self.current: dict[str, ArrayRecord] = {}
        self.failures: dict[int, int] = {}
        self.world: World | None = None
        self.teacher_log = TeacherLog()
        self._by_node: tuple[list[NodeInfo], dict[int, NodeInfo]] = ([], {})

    def bind(self, world: World) -> None:
        """Give the strategy the server-side view of the world (data splits, model space)."""
        self.world = world
        self.teacher_log.enabled = world.scenario.server.teacher_diagnostics

    def initial_arrays(self, world: World) -> ArrayRecord:
        """Seeded initial global model of every architecture group, keys ``<arch>.<param>``."""
        arrays: dict[str, Array] = {}
        for arch in world.groups:
            model = world.new_model(arch, seed=world.init_seed(arch))
            arrays.update(state_dict_to_arrayrecord(model.state_dict(), prefix=arch).items())
        return ArrayRecord(arrays)

    # ------------------------------------------------------------------ nodes and sampling
    def discover(self, grid: Grid, timeout: float = 120.0) -> list[NodeInfo]:
        """Handshake with every node once; returns nodes ordered by partition id.

        fedkd's own grids (inline, Ray) answer for their nodes from the simulated world
        (``grid.roster()``, the same answers), so no round messages the whole population; a
        Flower runtime's nodes are asked with ``query.hello``.

        When no node answers (a plain Flower ClientApp has no ``query.hello``), the nodes are
        the grid's node ids in sorted order with one architecture, and :attr:`plain` is set.
        """
        if self.nodes:
            return self.nodes
        roster = getattr(grid, "roster", lambda: None)()
        if roster is not None:  # fedkd's own grids know every node's answer
            self.nodes = [NodeInfo(**r) for r in roster]
            if self.nodes:  # index them now, not in the first round
                self.node(self.nodes[0].node_id)
            return self.nodes
        deadline = time.monotonic() + timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {self.min_available_nodes} "
                                   "nodes connected")
            time.sleep(0.05)
        msgs = [Message(RecordDict({"config": ConfigRecord({"seed": self.seed})}),
                        dst_node_id=nid, message_type=f"{MessageType.QUERY}.hello")
                for nid in node_ids]
        infos = []
        for reply in grid.send_and_receive(msgs):
            if reply.has_error():
                continue
            m = reply.content.metric_records["metrics"]
            infos.append(NodeInfo(node_id=reply.metadata.src_node_id, cid=int(m["partition-id"]),
                                  arch=str(reply.content.config_records["info"]["arch"]),
                                  num_examples=int(m["num-examples"]),
                                  label_counts=tuple(int(c) for c in m["label-counts"])))
        if not infos:
            self.plain = True
            infos = [NodeInfo(node_id=nid, cid=i, arch=PLAIN_ARCH, num_examples=0,
                              label_counts=()) for i, nid in enumerate(node_ids)]
        self.nodes = sorted(infos, key=lambda n: n.cid)
        return self.nodes

    def split_groups(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """The global arrays as one record per architecture (one unprefixed model if plain)."""
        return {PLAIN_ARCH: arrays} if self.plain else split_groups(arrays)

    def join_groups(self, groups: dict[str, ArrayRecord]) -> ArrayRecord:
        """Inverse of :meth:`split_groups`."""
        return groups[PLAIN_ARCH] if self.plain else join_groups(groups)

    def node(self, node_id: int) -> NodeInfo:
        """Handshake info of a node id (a dict lookup: rebuilt whenever :attr:`nodes` is
        replaced, so a population of 100,000 costs no scan per message)."""
        if self._by_node[0] is not self.nodes:
            self._by_node = (self.nodes, {n.node_id: n for n in self.nodes})
        return self._by_node[1][node_id]

    def sample(self, grid: Grid, server_round: int, fraction: float, minimum: int,
               stream: int = 0) -> list[NodeInfo]:
        """Seeded sample of ``max(int(N * fraction), minimum)`` nodes, in partition order.

        ``stream`` separates independent draws of one round (0: training, 1: evaluation).
        """
        nodes = self.discover(grid)
        k = min(len(nodes), max(int(len(nodes) * fraction + 1e-9), minimum))
        rng = np.random.default_rng([self.seed, server_round, stream] if stream
                                    else [self.seed, server_round])
        chosen = np.sort(rng.choice(len(nodes), size=k, replace=False))
        return [nodes[i] for i in chosen]

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send each sampled client its architecture group's model and the round's config."""
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        self.current = self.split_groups(arrays)
        return self.train_messages(server_round, nodes, config)

    #: Flower message type of the train messages (selects the client-side handler).
    train_type: str = MessageType.TRAIN

    def client_config(self, server_round: int) -> dict[str, Any]:
        """Extra config entries a subclass's client handler reads (none for FedAvg)."""
        return {}

    def extra_records(self, server_round: int, arch: str) -> dict[str, ArrayRecord]:
        """Extra named arrays a train message of group ``arch`` carries (none for FedAvg)."""
        return {}

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """One train message per node; nodes of one group share one RecordDict."""
        config = ConfigRecord({**dict(config), "server-round": server_round,
                               **self.client_config(server_round)})
        contents = {arch: RecordDict({"arrays": rec, **self.extra_records(server_round, arch),
                                      "config": config})
                    for arch, rec in self.current.items()}
        return [Message(contents[n.arch], dst_node_id=n.node_id,
                        message_type=self.train_type, group_id=str(server_round))
                for n in nodes]

    def messages_to(self, content: RecordDict, nodes: Sequence[NodeInfo],
                    server_round: int) -> list[Message]:
        """The round's train messages: one shared ``content`` to each of ``nodes``."""
        return [Message(content, dst_node_id=n.node_id, message_type=self.train_type,
                        group_id=str(server_round)) for n in nodes]

    def train_metrics(self, replies: Sequence[Message]) -> MetricRecord:
        """The replies' train metrics, averaged by ``weighted_by_key``."""
        return MetricRecord(dict(
            self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
            or {}))

    def split_replies(self, server_round: int,
                      replies: Iterable[Message]) -> list[Message]:
        """Replies without errors; errors are counted in ``self.failures[server_round]``."""
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        self.failures[server_round] = len(replies) - len(ok)
        return ok

    def aggregate_groups(self, replies: Sequence[Message]) -> dict[str, ArrayRecord]:
        """FedAvg per architecture; a group with no reply keeps its current model."""
        groups = dict(self.current)
        by_arch: dict[str, list[Message]] = {}
        for r in replies:
            by_arch.setdefault(self.node(r.metadata.src_node_id).arch, []).append(r)
        for arch, rs in by_arch.items():
            groups[arch] = weighted_average(
                [r.content.array_records["arrays"] for r in rs],
                [num_examples(r, self.weighted_by_key) for r in rs])
        return groups

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the returned weights per group and the train metrics by example count."""
        ok = self.split_replies(server_round, replies)
        if not ok:
            return None, None
        groups = self.aggregate_groups(ok)
        metrics = self.train_metrics(ok)
        return self.join_groups(self.fuse(server_round, ok, groups, metrics)), metrics

    def fuse(self, server_round: int, replies: Sequence[Message],
             groups: dict[str, ArrayRecord], metrics: MetricRecord) -> dict[str, ArrayRecord]:
        """The one post-averaging step: what the server does with the averaged groups.

        FedAvg keeps them. Server-side distillation (FedDF, FedFTG) and generator training
        (FedGen) override only this; they may add the round's statistics to ``metrics``.

        Parameters
        ----------
        server_round : int
            The round.
        replies : Sequence[Message]
            The round's replies without errors, in reply order.
        groups : dict[str, ArrayRecord]
            Averaged model of every architecture group.
        metrics : MetricRecord
            The round's aggregated train metrics (mutable).
        """
        return groups

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Federated evaluation on a seeded sample (off unless ``fraction_evaluate > 0``)."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes,
                            stream=1)
        groups = self.split_groups(arrays)
        config = ConfigRecord({**dict(config), "server-round": server_round})
        return [Message(RecordDict({"arrays": groups[n.arch], "config": config}),
                        dst_node_id=n.node_id, message_type=MessageType.EVALUATE,
                        group_id=str(server_round)) for n in nodes]
