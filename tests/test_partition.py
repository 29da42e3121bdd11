"""Partitioners and label-skew statistics."""

from __future__ import annotations

import numpy as np
import pytest

from fedkd.data.partition import (
    LOCAL_TEST_STREAM,
    PARTITIONERS,
    class_counts,
    local_test_size,
    skew,
    split_local_test,
)
from fedkd.errors import ScenarioError

NUM_CLASSES = 10
LABELS = np.repeat(np.arange(NUM_CLASSES), 200)  # 2000 balanced labels
ALL = ["iid", "dirichlet", "shards", "quantity"]


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    """Every index appears exactly once and each array is sorted int64."""
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_registry_names() -> None:
    assert PARTITIONERS.names() == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_cover_and_reproducible(name: str) -> None:
    fn = PARTITIONERS.get(name)
    a = fn(LABELS, 8, NUM_CLASSES, 0)
    b = fn(LABELS, 8, NUM_CLASSES, 0)
    c = fn(LABELS, 8, NUM_CLASSES, 1)
    assert len(a) == 8
    _check_cover(a, LABELS.size)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_exact_small_partition() -> None:
    parts = PARTITIONERS.get("iid")(np.arange(10) % 2, 3, 2, 0)
    assert [len(p) for p in parts] == [4, 3, 3]
    _check_cover(parts, 10)
    assert [p.tolist() for p in parts] == [
        np.sort(np.random.default_rng(0).permutation(10)[:4]).tolist(),
        np.sort(np.random.default_rng(0).permutation(10)[4:7]).tolist(),
        np.sort(np.random.default_rng(0).permutation(10)[7:]).tolist(),
    ]


def test_iid_sizes_and_low_skew() -> None:
    parts = PARTITIONERS.get("iid")(LABELS, 7, NUM_CLASSES, 3)
    assert sorted(len(p) for p in parts) == [285] * 2 + [286] * 5
    assert skew(class_counts(LABELS, parts, NUM_CLASSES)) < 0.15


def test_dirichlet_min_size_and_skew_order() -> None:
    fn = PARTITIONERS.get("dirichlet")
    low = fn(LABELS, 10, NUM_CLASSES, 0, alpha=0.1, min_size=20)
    high = fn(LABELS, 10, NUM_CLASSES, 0, alpha=100.0, min_size=20)
    assert min(len(p) for p in low) >= 20 and min(len(p) for p in high) >= 20
    skew_low = skew(class_counts(LABELS, low, NUM_CLASSES))
    skew_high = skew(class_counts(LABELS, high, NUM_CLASSES))
    assert skew_low > 0.5 > 0.1 > skew_high


def test_dirichlet_errors() -> None:
    fn = PARTITIONERS.get("dirichlet")
    for alpha in (0.0, -1.0, "a"):
        with pytest.raises(ScenarioError) as err:
            fn(LABELS, 5, NUM_CLASSES, 0, alpha=alpha)
        assert err.value.path == "partition.params.alpha"
    with pytest.raises(ScenarioError) as err:
        fn(LABELS, 10, NUM_CLASSES, 0, min_size=201)
    assert err.value.path == "partition.params.min_size"
    with pytest.raises(ScenarioError) as err:  # feasible in total, never met by a draw
        fn(LABELS, 12, NUM_CLASSES, 0, alpha=0.001, min_size=150)
    assert err.value.path == "partition.params.min_size"


def test_shards_classes_per_client() -> None:
    fn = PARTITIONERS.get("shards")
    for clients, per_client in ((10, 1), (10, 2), (5, 2), (5, 4), (20, 1)):
        parts = fn(LABELS, clients, NUM_CLASSES, 0, classes_per_client=per_client)
        _check_cover(parts, LABELS.size)
        counts = class_counts(LABELS, parts, NUM_CLASSES)
        assert ((counts > 0).sum(axis=1) <= per_client).all()
        assert [len(p) for p in parts] == [LABELS.size // clients] * clients
    two = fn(LABELS, 10, NUM_CLASSES, 0, classes_per_client=2)
    assert skew(class_counts(LABELS, two, NUM_CLASSES)) >= 0.8


def test_shards_errors() -> None:
    fn = PARTITIONERS.get("shards")
    with pytest.raises(ScenarioError) as err:
        fn(LABELS, 10, NUM_CLASSES, 0, classes_per_client=0)
    assert err.value.path == "partition.params.classes_per_client"
    with pytest.raises(ScenarioError) as err:
        fn(np.arange(20) % 10, 10, NUM_CLASSES, 0, classes_per_client=3)
    assert err.value.path == "partition.params.classes_per_client"


def test_quantity_sizes() -> None:
    fn = PARTITIONERS.get("quantity")
    parts = fn(LABELS, 10, NUM_CLASSES, 0, sigma=1.5, min_size=50)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 50 and sum(sizes) == LABELS.size
    assert max(sizes) > 3 * min(sizes)
    even = fn(LABELS, 10, NUM_CLASSES, 0, sigma=0.0, min_size=0)
    assert sorted(len(p) for p in even) == [200] * 10
    exact = fn(LABELS, 10, NUM_CLASSES, 0, min_size=200)
    assert [len(p) for p in exact] == [200] * 10


def test_quantity_errors() -> None:
    fn = PARTITIONERS.get("quantity")
    with pytest.raises(ScenarioError) as err:
        fn(LABELS, 10, NUM_CLASSES, 0, min_size=201)
    assert err.value.path == "partition.params.min_size"
    with pytest.raises(ScenarioError) as err:
        fn(LABELS, 10, NUM_CLASSES, 0, sigma=-0.5)
    assert err.value.path == "partition.params.sigma"


def test_common_errors() -> None:
    fn = PARTITIONERS.get("iid")
    with pytest.raises(ScenarioError):
        fn(LABELS, 0, NUM_CLASSES, 0)
    with pytest.raises(ScenarioError):
        fn(np.arange(3), 4, 3, 0)
    with pytest.raises(ValueError, match="labels"):
        fn(np.array([0, 5]), 1, 3, 0)


def test_class_counts_and_skew_values() -> None:
    labels = np.array([0, 0, 1, 1])
    parts = [np.array([0, 1]), np.array([2, 3])]
    counts = class_counts(labels, parts, 3)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[2, 0, 0], [0, 2, 0]]
    assert skew(counts) == pytest.approx(0.5)
    assert skew(class_counts(labels, [np.array([0, 2]), np.array([1, 3])], 3)) == 0.0


# ----------------------------------------------------------------------------- local test


def test_local_test_size_rounding() -> None:
    # round half up, at least one when the fraction is positive, never the whole client
    assert [local_test_size(10, f) for f in (0.0, 0.04, 0.05, 0.25, 0.3, 0.99)] == [
        0, 1, 1, 3, 3, 9]
    assert local_test_size(1, 0.5) == 0 and local_test_size(2, 0.9) == 1


def test_split_local_test_stratified_exact() -> None:
    labels = np.array([0] * 6 + [1] * 3 + [2])  # one client: 6, 3, 1 samples of classes 0-2
    part = np.arange(10)
    train, test = split_local_test(labels, [part], 0.3, seed=5)
    # 3 test samples; shares 1.8, 0.9, 0.3 -> floors 1, 0, 0, the two largest remainders
    # (class 1: 0.9, class 0: 0.8) get one more -> 2, 1, 0
    assert np.bincount(labels[test[0]], minlength=3).tolist() == [2, 1, 0]
    rng = np.random.default_rng([5, LOCAL_TEST_STREAM, 0])
    expected = np.sort(np.concatenate([rng.permutation(np.arange(6))[:2],
                                       rng.permutation(np.arange(6, 9))[:1],
                                       rng.permutation(np.arange(9, 10))[:0]]))
    assert test[0].tolist() == expected.tolist()
    assert train[0].tolist() == np.setdiff1d(part, expected).tolist()


def test_split_local_test_disjoint_cover_and_reproducible() -> None:
    parts = PARTITIONERS.get("dirichlet")(LABELS, 8, NUM_CLASSES, 0, alpha=0.3)
    train, test = split_local_test(LABELS, parts, 0.2, seed=0)
    again, _ = split_local_test(LABELS, parts, 0.2, seed=0)
    other, _ = split_local_test(LABELS, parts, 0.2, seed=1)
    for p, tr, te in zip(parts, train, test, strict=True):
        assert tr.dtype == te.dtype == np.int64
        assert not np.intersect1d(tr, te).size
        assert np.array_equal(np.sort(np.concatenate([tr, te])), p)
        assert len(te) == local_test_size(len(p), 0.2)
        # stratified: each class's test count is within one of its share
        share = class_counts(LABELS, [p], NUM_CLASSES)[0] * len(te) / len(p)
        assert np.all(np.abs(class_counts(LABELS, [te], NUM_CLASSES)[0] - share) < 1)
    assert all(np.array_equal(a, b) for a, b in zip(train, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(train, other, strict=True))


def test_zero_local_test_fraction_keeps_parts() -> None:
    parts = PARTITIONERS.get("iid")(LABELS, 4, NUM_CLASSES, 2)
    train, test = split_local_test(LABELS, parts, 0.0, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(train, parts, strict=True))
    assert [len(t) for t in test] == [0, 0, 0, 0]
    with pytest.raises(ScenarioError) as err:
        split_local_test(LABELS, parts, 1.0, seed=2)
    assert err.value.path == "data.local_test_fraction"
