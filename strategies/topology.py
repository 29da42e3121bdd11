"""Communication topologies for decentralized peers, and their gossip mixing matrices.

A topology says which peers exchange messages in a round: an undirected :class:`networkx.Graph`
on the nodes ``0..n-1`` (a node is a peer's partition id). Static topologies build their graph
once from the scenario seed; time-varying ones (``time_varying = True``) draw a new graph each
round from ``np.random.default_rng([seed, server_round, salt])``.

Add a topology by registering a :class:`Topology` subclass with
``@TOPOLOGIES.register("name")`` whose keyword arguments (with defaults) are its YAML params;
strategies take ``topology: {name: ..., params: {...}}`` (:func:`make_topology`).

References
----------
- Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study
  for Decentralized Parallel Stochastic Gradient Descent" (D-PSGD), NeurIPS 2017: gossip
  averaging with a doubly stochastic mixing matrix, whose spectral gap bounds how fast the
  peers reach consensus (:func:`spectral_gap`).
- Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004, and Boyd, Diaconis
  & Xiao, "Fastest mixing Markov chain on a graph", 2004: Metropolis–Hastings weights
  (:func:`metropolis_weights`).
- Watts & Strogatz, "Collective dynamics of 'small-world' networks", Nature 1998
  (``small_world``).
- Erdős & Rényi, "On random graphs I", 1959 (``erdos_renyi``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np

from fedkd.errors import ScenarioError
from fedkd.registry import Registry

TOPOLOGIES: Registry[type] = Registry("topology")

#: Mixed into the per-round seed of time-varying topologies, so that their draws are
#: independent of other per-round draws seeded with ``[seed, server_round]``.
_SALT = 0x70B0


class Topology:
    """A communication graph over ``n`` peers.

    Parameters
    ----------
    n : int
        Number of peers (nodes ``0..n-1``).
    seed : int
        Seed of the random graph (the scenario seed).
    """

    time_varying: bool = False

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"a topology needs n >= 1 peers, got {n}")
        self.n = int(n)
        self.seed = int(seed)
        self._graph: nx.Graph | None = None

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        """Build the graph (subclasses); ``rng_seed`` is the seed, or per-round seed entropy."""
        raise NotImplementedError

    def graph(self, server_round: int) -> nx.Graph:
        """The graph of round ``server_round``: the same (cached) graph every round for a
        static topology, a fresh draw per round for a time-varying one."""
        if self.time_varying:
            return self._complete(self.build([self.seed, int(server_round), _SALT]))
        if self._graph is None:
            self._graph = self._complete(self.build(self.seed))
        return self._graph

    def _complete(self, g: nx.Graph) -> nx.Graph:
        """Every node ``0..n-1`` present, no self-loops (``cycle_graph(1)`` has one)."""
        g.add_nodes_from(range(self.n))
        g.remove_edges_from(list(nx.selfloop_edges(g)))
        return g


@TOPOLOGIES.register("complete")
class Complete(Topology):
    """Every peer talks to every other peer."""

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        return nx.complete_graph(self.n)


@TOPOLOGIES.register("ring")
class Ring(Topology):
    """Peer ``i`` talks to ``i - 1`` and ``i + 1`` (mod n)."""

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        return nx.cycle_graph(self.n)


@TOPOLOGIES.register("k_regular")
class KRegular(Topology):
    """A uniformly random ``degree``-regular graph (``degree * n`` even, ``degree < n``)."""

    def __init__(self, n: int, seed: int, degree: int = 4) -> None:
        super().__init__(n, seed)
        if not 0 <= degree < n:
            raise ValueError(f"degree must satisfy 0 <= degree < n={n}, got {degree}")
        if (degree * n) % 2:
            raise ValueError(f"degree * n must be even, got degree={degree}, n={n}")
        self.degree = int(degree)

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        return nx.random_regular_graph(self.degree, self.n, seed=rng_seed)


@TOPOLOGIES.register("small_world")
class SmallWorld(Topology):
    """Watts–Strogatz: a ring lattice of ``k`` nearest neighbours, each edge rewired with
    probability ``p`` (redrawn until connected)."""

    def __init__(self, n: int, seed: int, k: int = 4, p: float = 0.1) -> None:
        super().__init__(n, seed)
        if not 2 <= k < n:
            raise ValueError(f"k must satisfy 2 <= k < n={n}, got {k}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.k, self.p = int(k), float(p)

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        return nx.connected_watts_strogatz_graph(self.n, self.k, self.p, tries=100,
                                                 seed=rng_seed)


@TOPOLOGIES.register("erdos_renyi")
class ErdosRenyi(Topology):
    """G(n, p): each edge present independently with probability ``p`` (may be
    disconnected)."""

    def __init__(self, n: int, seed: int, p: float = 0.3) -> None:
        super().__init__(n, seed)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        return nx.erdos_renyi_graph(self.n, self.p, seed=rng_seed)


@TOPOLOGIES.register("star")
class Star(Topology):
    """Every peer talks to the hub ``center`` only."""

    def __init__(self, n: int, seed: int, center: int = 0) -> None:
        super().__init__(n, seed)
        if not 0 <= center < n:
            raise ValueError(f"center must satisfy 0 <= center < n={n}, got {center}")
        self.center = int(center)

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        g = nx.star_graph(self.n - 1)  # hub 0, leaves 1..n-1
        if self.center == 0:
            return g
        return nx.relabel_nodes(g, {0: self.center, self.center: 0})


@TOPOLOGIES.register("random_matching")
class RandomMatching(Topology):
    """A fresh random perfect matching each round (odd n: one peer sits the round out)."""

    time_varying = True

    def build(self, rng_seed: int | list[int]) -> nx.Graph:
        perm = np.random.default_rng(rng_seed).permutation(self.n)
        g = nx.Graph()
        g.add_nodes_from(range(self.n))
        g.add_edges_from((int(perm[i]), int(perm[i + 1])) for i in range(0, self.n - 1, 2))
        return g


def make_topology(spec: Mapping[str, Any] | None, n: int, seed: int,
                  path: str = "strategy.params.topology") -> Topology:
    """Instantiate the topology ``spec = {"name": ..., "params": {...}}`` over ``n`` peers.

    ``None`` means ``{"name": "complete"}``. Errors are :class:`ScenarioError` at ``path``.
    """
    from fedkd.scenario import check_kwargs

    spec = {"name": "complete"} if spec is None else spec
    if not isinstance(spec, Mapping):
        raise ScenarioError(path, spec, "a mapping {name: ..., params: {...}}")
    for key in spec:
        if key not in ("name", "params"):
            raise ScenarioError(f"{path}.{key}", spec[key], "a known key: ['name', 'params']")
    cls = TOPOLOGIES.get(spec.get("name", "complete"), f"{path}.name")
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise ScenarioError(f"{path}.params", params, "a mapping of the topology's params")
    params = dict(params)
    check_kwargs(cls, params, f"{path}.params", skip=("n", "seed"))
    try:
        return cls(n, seed, **params)
    except ValueError as exc:
        raise ScenarioError(f"{path}.params", params, str(exc)) from None


def metropolis_weights(graph: nx.Graph, nodes: Sequence[int] | None = None) -> np.ndarray:
    """Metropolis–Hastings mixing matrix of the subgraph induced by ``nodes``.

    Parameters
    ----------
    graph : nx.Graph
        Communication graph.
    nodes : Sequence[int], optional
        Nodes to keep, in the order of the rows (default: every node, sorted).

    Returns
    -------
    np.ndarray
        ``(m, m)`` float64, symmetric and doubly stochastic: ``W[i, j] = 1 / (1 + max(d_i,
        d_j))`` for an edge (degrees within the induced subgraph), ``W[i, i] = 1 - sum_j
        W[i, j]``, 0 otherwise.
    """
    order = sorted(graph.nodes) if nodes is None else list(nodes)
    sub = graph.subgraph(order)
    index = {v: i for i, v in enumerate(order)}
    w = np.zeros((len(order), len(order)), dtype=np.float64)
    for u, v in sub.edges:
        if u == v:
            continue
        w[index[u], index[v]] = w[index[v], index[u]] = 1.0 / (
            1 + max(sub.degree[u], sub.degree[v]))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def spectral_gap(w: np.ndarray) -> float:
    """``1 - max(|lambda_2|, |lambda_n|)`` of a symmetric mixing matrix, in ``[0, 1]``.

    1.0 for a single node; 0.0 for a disconnected graph (no consensus).
    """
    w = np.asarray(w, dtype=np.float64)
    if w.shape[0] <= 1:
        return 1.0
    eig = np.linalg.eigvalsh(w)  # ascending
    return float(np.clip(1.0 - max(abs(eig[-2]), abs(eig[0])), 0.0, 1.0))


def neighbours(graph: nx.Graph, active: Sequence[int]) -> dict[int, list[int]]:
    """Each active node's sorted active neighbours (itself excluded)."""
    keep = set(active)
    return {v: sorted(u for u in graph.neighbors(v) if u in keep and u != v) for v in active}
