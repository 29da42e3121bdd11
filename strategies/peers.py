"""Peers on a communication graph: who talks to whom each round, and what it costs per edge.

The piece every decentralized strategy (:mod:`strategies.peer_kd`, :mod:`strategies.dpsgd`)
shares. The scenario names a topology (:mod:`strategies.topology`) over the clients'
partition ids; each round the sampled peers talk only to their sampled neighbours. Messages
still travel through the Flower grid, the server acting as a relay that forwards only along
edges, so the engine, the codecs and the byte ledger are those of every other strategy; what a
decentralized deployment would pay is logged per edge (:attr:`GraphPeers.edge_log`, the
``round, src, dst`` of every edge a payload crossed; the recorder writes ``edges.parquet``
with the sender's encoded upload as each edge's bytes, unless the strategy sized the edge
itself in :attr:`GraphPeers.edge_sizes`).

Records (Lian et al., NeurIPS 2017, measure consensus and the mixing matrix's spectral gap;
Koloskova et al., ICML 2020, the gap as the graph's connectivity):

- ``spectral-gap``: ``1 - |lambda_2|`` of the Metropolis-Hastings mixing matrix of the round's
  whole graph (:func:`strategies.topology.spectral_gap`), ``edges``: the edges used;
- after each evaluation, next to the peers' mean and minimum test accuracy: ``acc-worst10``
  (mean of the worst 10 % of peers) and ``consensus``: the mean pairwise disagreement of the
  peers' test-set predictions (:func:`disagreement`; 0 when every peer predicts alike).

Budgets (``comm.budget``) count the bytes over the edges, not the relay's messages: before a
round's first message, :meth:`GraphPeers.plan_round` prices every link between sampled
neighbours (both directions: each sender's last encoded upload of the round's query, or
before any its float32 size, :meth:`GraphPeers.payload_prior`) and asks
:class:`fedkd.budget.Budgeted` which links fit; a dropped link is absent from the round's
graph (``sample_fewer``), or the run ends cleanly (``stop``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedkd.world import World, local_summary
from strategies.fedavg import NodeInfo
from strategies.topology import (
    Topology,
    make_topology,
    metropolis_weights,
    neighbours,
    spectral_gap,
)


def disagreement(predictions: np.ndarray, num_classes: int) -> float:
    """Mean over sample and peer pairs of ``pred_i != pred_j``.

    Parameters
    ----------
    predictions : np.ndarray
        ``(K, N)`` predicted classes of K peers on N samples.
    num_classes : int
        Number of classes.

    Returns
    -------
    float
        ``1 - mean_n sum_c m_c (m_c - 1) / (K (K - 1))`` with ``m_c`` the peers predicting
        class c on sample n; 0.0 for fewer than two peers.
    """
    k = predictions.shape[0]
    if k < 2:
        return 0.0
    counts = np.zeros((predictions.shape[1], num_classes), dtype=np.int64)
    for row in predictions:
        counts[np.arange(len(row)), row] += 1
    agree = (counts * (counts - 1)).sum(axis=1) / (k * (k - 1))
    return float(1.0 - agree.mean())


class GraphPeers:
    """Mixin of a :class:`strategies.local.Local` strategy whose peers talk along a graph.

    Call :meth:`init_graph` in ``__init__`` and :meth:`bind_graph` in ``bind``.
    """

    topology: Topology | None
    edge_log: dict[int, list[tuple[int, int]]]
    #: Set by :class:`fedkd.budget.Budgeted`: ``(round, prices) -> kept`` indices of links.
    edge_budget: Callable[[int, list[int]], list[int]] | None = None
    #: The message type whose replies cross the edges (their sizes price a link).
    query_type: str = ""

    def init_graph(self, topology: Mapping[str, Any] | None) -> None:
        """Keep the scenario's topology block (built at bind, when the peers are known)."""
        self.topology_spec = dict(topology) if topology is not None else None
        self.topology = None
        self.edge_log = {}
        self.edge_sizes: dict[int, dict[tuple[int, int], int]] = {}
        self.graph_metrics: dict[int, dict[str, float]] = {}
        self._gap: dict[int, float] = {}
        self._planned: tuple[int, nx.Graph] | None = None

    def bind_graph(self, world: World) -> None:
        """Build the topology over the world's clients, seeded by the scenario."""
        self.topology = make_topology(self.topology_spec, world.num_clients,
                                      world.scenario.seed)

    def plan_round(self, server_round: int, nodes: Sequence[NodeInfo], grid: Grid) -> None:
        """Fix the round's graph before its first message: the topology's, less the links
        between ``nodes`` a budget drops (:class:`fedkd.budget.Budgeted`)."""
        assert self.topology is not None, "bind(world) first"
        graph = self.topology.graph(server_round)
        if self.edge_budget is not None:
            nbrs = neighbours(graph, [n.cid for n in nodes])
            links = sorted({(min(a, b), max(a, b)) for a in nbrs for b in nbrs[a]})
            price = {n.cid: self.edge_price(n, grid) for n in nodes}
            keep = set(self.edge_budget(server_round, [price[a] + price[b] for a, b in links]))
            dropped = [link for i, link in enumerate(links) if i not in keep]
            if dropped:
                graph = nx.Graph(graph)
                graph.remove_edges_from(dropped)
        self._planned = (server_round, graph)

    def round_graph(self, server_round: int) -> nx.Graph:
        """The round's graph (as planned, or the topology's)."""
        assert self.topology is not None, "bind(world) first"
        if self._planned is not None and self._planned[0] == server_round:
            return self._planned[1]
        return self.topology.graph(server_round)

    def edge_price(self, node: NodeInfo, grid: Grid) -> int:
        """Bytes ``node`` sends over each of its edges in a round: its largest encoded reply
        to :attr:`query_type` so far, else :meth:`payload_prior`."""
        seen = getattr(grid, "reply_sizes", {}).get((self.query_type, node.node_id))
        return int(seen) if seen is not None else self.payload_prior(node)

    def payload_prior(self, node: NodeInfo) -> int:
        """Bytes of what ``node`` sends over an edge, before any was measured (float32)."""
        raise NotImplementedError

    def neighbourhoods(self, server_round: int,
                       peers: Sequence[NodeInfo]) -> dict[int, list[int]]:
        """Each sampled peer's sampled neighbours (partition ids); logs the round's edges."""
        assert self.topology is not None, "bind(world) first"
        graph = self.round_graph(server_round)
        nbrs = neighbours(graph, [p.cid for p in peers])
        self.edge_log[server_round] = sorted((src, dst) for dst, srcs in nbrs.items()
                                             for src in srcs)
        key = server_round if self.topology.time_varying else 0
        if key not in self._gap:
            self._gap[key] = spectral_gap(metropolis_weights(self.topology.graph(server_round)))
        self.graph_metrics[server_round] = {"spectral-gap": self._gap[key],
                                            "edges": len(self.edge_log[server_round])}
        return nbrs

    def teacher_mask(self, server_round: int, peers: Sequence[NodeInfo]) -> torch.Tensor:
        """``(K, K)`` boolean: ``mask[k, l]`` when peer l is a sampled neighbour of peer k."""
        nbrs = self.neighbourhoods(server_round, peers)
        index = {p.cid: i for i, p in enumerate(peers)}
        mask = torch.zeros(len(peers), len(peers), dtype=torch.bool)
        for p in peers:
            for q in nbrs[p.cid]:
                mask[index[p.cid], index[q]] = True
        return mask

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base strategy's result, its metrics with the graph's (spectral gap, edges)."""
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        extra = self.graph_metrics.get(server_round)
        if metrics is not None and extra is not None:
            metrics = MetricRecord({**dict(metrics), **extra})
        return arrays, metrics

    # ------------------------------------------------------------------ evaluation
    def private_eval_config(self) -> dict[str, Any]:
        """Ask every peer for its test-set predictions (measured, not sent on any edge)."""
        return {"test-predictions": 1}

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The peers' mean and minimum accuracy, plus ``acc-worst10``, ``consensus`` and, with
        local test splits, ``local-acc-min``."""
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        evals = [r.content.metric_records["metrics"] for r in replies if not r.has_error()]
        if metrics is None or not evals:
            return metrics
        accs = [float(m["eval-acc"]) for m in evals]  # type: ignore[arg-type]
        preds = np.asarray([list(m["test-pred"]) for m in evals  # type: ignore[arg-type]
                            if "test-pred" in m], dtype=np.int64)
        extra = {"acc-worst10": local_summary(accs)["local-acc-worst10"]}
        local = [float(m["local-acc"]) for m in evals if "local-acc" in m]  # type: ignore[arg-type]
        if local:
            extra["local-acc-min"] = min(local)
        if len(preds):
            world = getattr(self, "world", None)
            classes = world.data.num_classes if world is not None else int(preds.max()) + 1
            extra["consensus"] = disagreement(preds, classes)
        return MetricRecord({**dict(metrics), **extra})


def with_local_loss(config: ConfigRecord, reply: Message) -> ConfigRecord:
    """``config`` and the ``local-loss`` a peer reported with its upload: the second message
    of a round carries it back, so the round's train reply reports the local training."""
    return ConfigRecord({**dict(config),
                         "local-loss": reply.content.metric_records["metrics"]["train-loss"]})
