"""Topologies: pinned seeded graphs, Metropolis weights, spectral gaps, spec errors."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from fedkd.errors import ScenarioError
from strategies.topology import (
    TOPOLOGIES,
    make_topology,
    metropolis_weights,
    neighbours,
    spectral_gap,
)

NAMES = ["complete", "erdos_renyi", "k_regular", "random_matching", "ring", "small_world",
         "star"]

# n=20, seed=0, default params (networkx 3.6 / numpy Generator streams)
DEGREES = {
    "complete": ([19] * 20, True),
    "ring": ([2] * 20, True),
    "k_regular": ([4] * 20, True),
    "small_world": ([3] + [4] * 18 + [5], True),
    "erdos_renyi": ([2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 5, 6, 6, 6, 7, 8, 8, 9, 9, 9], True),
    "star": ([1] * 19 + [19], True),
    "random_matching": ([1] * 20, False),
}


def edges(g: nx.Graph) -> set[tuple[int, int]]:
    return {(min(u, v), max(u, v)) for u, v in g.edges}


def test_registry_names() -> None:
    assert TOPOLOGIES.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_pinned_degrees_and_connectivity(name: str) -> None:
    g = make_topology({"name": name}, 20, 0).graph(1)
    assert sorted(g.nodes) == list(range(20))
    degrees, connected = DEGREES[name]
    assert sorted(d for _, d in g.degree) == degrees
    assert nx.is_connected(g) is connected


def test_small_n_edge_cases() -> None:
    g = make_topology({"name": "random_matching"}, 5, 0).graph(1)
    assert sorted(d for _, d in g.degree) == [0, 1, 1, 1, 1]
    assert edges(g) == {(0, 4), (1, 2)}
    assert edges(make_topology({"name": "random_matching"}, 5, 0).graph(2)) == {(0, 4), (2, 3)}
    ring1 = make_topology({"name": "ring"}, 1, 0).graph(1)
    assert list(ring1.nodes) == [0] and ring1.number_of_edges() == 0
    assert edges(make_topology({"name": "ring"}, 2, 0).graph(1)) == {(0, 1)}
    star = make_topology({"name": "star", "params": {"center": 3}}, 6, 0).graph(1)
    assert dict(star.degree) == {0: 1, 1: 1, 2: 1, 3: 5, 4: 1, 5: 1}


@pytest.mark.parametrize("name", ["small_world", "erdos_renyi", "k_regular"])
def test_seeded(name: str) -> None:
    a = edges(make_topology({"name": name}, 20, 0).graph(1))
    assert a == edges(make_topology({"name": name}, 20, 0).graph(1))
    assert a != edges(make_topology({"name": name}, 20, 1).graph(1))


@pytest.mark.parametrize("name", ["complete", "ring", "k_regular", "small_world",
                                  "erdos_renyi", "star"])
def test_static_same_every_round(name: str) -> None:
    topo = make_topology({"name": name}, 20, 0)
    assert not topo.time_varying
    assert topo.graph(1) is topo.graph(7)


def test_random_matching_varies_per_round() -> None:
    topo = make_topology({"name": "random_matching"}, 20, 0)
    assert topo.time_varying
    assert edges(topo.graph(1)) != edges(topo.graph(2))
    assert edges(topo.graph(1)) == edges(make_topology({"name": "random_matching"}, 20, 0)
                                         .graph(1))


def test_metropolis_path() -> None:
    w = metropolis_weights(nx.path_graph(4))
    t = 1 / 3
    expected = np.array([[2 * t, t, 0, 0], [t, t, t, 0], [0, t, t, t], [0, 0, t, 2 * t]])
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    sub = metropolis_weights(nx.path_graph(4), [0, 1, 3])  # edge 0-1, node 3 isolated
    np.testing.assert_allclose(sub, [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]], rtol=0,
                               atol=1e-15)
    assert sub[2, 2] == 1.0


def test_metropolis_complete() -> None:
    np.testing.assert_allclose(metropolis_weights(nx.complete_graph(5)), np.full((5, 5), 0.2),
                               rtol=0, atol=1e-15)


def test_spectral_gap() -> None:
    assert spectral_gap(metropolis_weights(nx.complete_graph(5))) == pytest.approx(1.0,
                                                                                   abs=1e-12)
    assert spectral_gap(metropolis_weights(nx.cycle_graph(4))) == pytest.approx(2 / 3,
                                                                                abs=1e-12)
    matching = nx.Graph([(0, 1), (2, 3)])
    assert spectral_gap(metropolis_weights(matching)) == pytest.approx(0.0, abs=1e-12)
    assert spectral_gap(np.ones((1, 1))) == 1.0


def test_neighbours() -> None:
    assert neighbours(nx.cycle_graph(6), [0, 1, 3, 5]) == {0: [1, 5], 1: [0], 3: [], 5: [0]}


def test_make_topology_errors() -> None:
    with pytest.raises(ScenarioError) as err:
        make_topology({"name": "torus"}, 5, 0)
    assert str(err.value).startswith("strategy.params.topology.name")
    with pytest.raises(ScenarioError) as err:
        make_topology({"name": "small_world", "params": {"q": 0.2}}, 10, 0)
    assert str(err.value).startswith("strategy.params.topology.params.q:")
    with pytest.raises(ScenarioError) as err:
        make_topology({"name": "k_regular", "params": {"degree": 3}}, 5, 0)
    assert str(err.value).startswith("strategy.params.topology.params:")
    assert "even" in str(err.value)
    with pytest.raises(ScenarioError) as err:
        make_topology({"name": "ring", "parmas": {}}, 5, 0)
    assert str(err.value).startswith("strategy.params.topology.parmas:")
    with pytest.raises(ScenarioError) as err:
        make_topology({"name": "ring", "params": {"n": 3}}, 5, 0)
    assert str(err.value).startswith("strategy.params.topology.params.n:")
    with pytest.raises(ScenarioError) as err:
        make_topology({"name": "erdos_renyi", "params": {"p": 1.5}}, 5, 0)
    assert str(err.value).startswith("strategy.params.topology.params:")
    topo = make_topology(None, 5, 0)
    assert type(topo) is TOPOLOGIES.get("complete")
    assert topo.graph(1).number_of_edges() == 10
