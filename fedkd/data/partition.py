"""Partitioners that split the client pool among clients, plus label-skew statistics.

Every partitioner has the signature
``fn(labels, num_clients, num_classes, seed, **params) -> list[np.ndarray]`` and returns one
sorted int64 index array per client; the arrays are disjoint and cover every sample.
:func:`split_local_test` then holds out a stratified local test split of each client's part
(``data.local_test_fraction``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedkd.errors import ScenarioError
from fedkd.registry import Registry

PARTITIONERS: Registry[Callable[..., list[np.ndarray]]] = Registry("partitioner")

MAX_DIRICHLET_TRIES = 1000


# ----------------------------------------------------------------------------- checks


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int_param(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as int, or raise a ScenarioError naming ``partition.params.<name>``."""
    if not _is_int(value) or int(value) < minimum:
        raise ScenarioError(f"partition.params.{name}", value, f"an integer >= {minimum}")
    return int(value)


def _check_inputs(labels: np.ndarray, num_clients: int, num_classes: int) -> np.ndarray:
    """Validate the common arguments and return the labels as a 1-D int64 array."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if not _is_int(num_clients) or num_clients < 1:
        raise ScenarioError("num_clients", num_clients, "an integer >= 1")
    if num_clients > labels.size:
        raise ScenarioError(
            "num_clients", num_clients, f"at most the {labels.size} samples of the client pool"
        )
    return labels.astype(np.int64, copy=False)


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Sort each client's indices and cast them to int64."""
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# ----------------------------------------------------------------------------- iid


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_clients: int, num_classes: int, seed: int) -> list[np.ndarray]:
    """Shuffle the samples and deal them out in sizes that differ by at most one.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the pool.
    num_clients, num_classes : int
        Number of clients and of classes.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    list of numpy.ndarray
        One sorted index array per client; earlier clients get the extra samples.
    """
    labels = _check_inputs(labels, num_clients, num_classes)
    perm = np.random.default_rng(seed).permutation(labels.size)
    return _finish(np.array_split(perm, num_clients))


# ----------------------------------------------------------------------------- dirichlet


def _dirichlet_round(
    labels: np.ndarray, num_clients: int, num_classes: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """One draw of the per-class Dirichlet split.

    Clients already holding ``n / num_clients`` samples get no share of later classes; when
    the draw puts all mass on such clients, the class is redrawn over the open clients only.
    """
    buckets: list[list[int]] = [[] for _ in range(num_clients)]
    fair_share = labels.size / num_clients
    for k in range(num_classes):
        idx_k = np.flatnonzero(labels == k)
        if idx_k.size == 0:
            continue
        rng.shuffle(idx_k)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        open_clients = np.array([len(b) < fair_share for b in buckets])
        proportions = np.where(open_clients, proportions, 0.0)
        total = proportions.sum()
        if not np.isfinite(total) or total <= 0.0:
            proportions = np.zeros(num_clients)
            proportions[open_clients] = rng.dirichlet(np.full(int(open_clients.sum()), alpha))
            total = proportions.sum()
        cuts = (np.cumsum(proportions / total) * idx_k.size).astype(int)[:-1]
        for bucket, chunk in zip(buckets, np.split(idx_k, cuts), strict=True):
            bucket.extend(chunk.tolist())
    return buckets


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    seed: int,
    alpha: float = 0.5,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients by proportions ~ Dir(alpha).

    The standard FedAvg/FedDF/PFLlib scheme: clients already holding ``n / num_clients``
    samples get no more, and the whole draw is repeated until every client has at least
    ``min_size`` samples.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the pool.
    num_clients, num_classes : int
        Number of clients and of classes.
    seed : int
        Seed of the draws.
    alpha : float
        Dirichlet concentration, > 0; smaller means more skew.
    min_size : int
        Minimum number of samples per client.

    Returns
    -------
    list of numpy.ndarray
        One sorted index array per client.

    Raises
    ------
    ScenarioError
        For ``alpha <= 0``, a bad ``min_size``, or when no draw within 1000 tries meets
        ``min_size``.
    """
    labels = _check_inputs(labels, num_clients, num_classes)
    if not _is_number(alpha) or not 0.0 < float(alpha) < math.inf:
        raise ScenarioError("partition.params.alpha", alpha, "a number > 0")
    min_size = _check_int_param("min_size", min_size, 0)
    if min_size * num_clients > labels.size:
        raise ScenarioError(
            "partition.params.min_size",
            min_size,
            f"at most {labels.size // num_clients} ({labels.size} samples, {num_clients} clients)",
        )
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DIRICHLET_TRIES):
        buckets = _dirichlet_round(labels, num_clients, num_classes, float(alpha), rng)
        if min(len(b) for b in buckets) >= min_size:
            return _finish([np.array(b, dtype=np.int64) for b in buckets])
    raise ScenarioError(
        "partition.params.min_size",
        min_size,
        f"a smaller value (no Dirichlet draw met it in {MAX_DIRICHLET_TRIES} tries)",
    )


# ----------------------------------------------------------------------------- shards


@PARTITIONERS.register("shards")
def shards(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    seed: int,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al.: label-sorted shards dealt to clients.

    The samples are sorted by label (random order inside a class), cut into
    ``num_clients * classes_per_client`` shards of near-equal size, and each client receives
    ``classes_per_client`` random shards. A shard can straddle a class boundary when the class
    sizes are not multiples of the shard size.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the pool.
    num_clients, num_classes : int
        Number of clients and of classes.
    seed : int
        Seed of the within-class order and of the shard assignment.
    classes_per_client : int
        Shards per client, >= 1.

    Returns
    -------
    list of numpy.ndarray
        One sorted index array per client.

    Raises
    ------
    ScenarioError
        For ``classes_per_client < 1`` or more shards than samples.
    """
    labels = _check_inputs(labels, num_clients, num_classes)
    per_client = _check_int_param("classes_per_client", classes_per_client, 1)
    num_shards = num_clients * per_client
    if num_shards > labels.size:
        raise ScenarioError(
            "partition.params.classes_per_client",
            classes_per_client,
            f"a value with num_clients * classes_per_client <= {labels.size} samples",
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(labels.size)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards)
    parts = [
        np.concatenate([pieces[s] for s in order[c * per_client : (c + 1) * per_client]])
        for c in range(num_clients)
    ]
    return _finish(parts)


# ----------------------------------------------------------------------------- quantity


def _lognormal_sizes(
    n: int, num_clients: int, sigma: float, min_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Client sizes summing to ``n``: ``min_size`` each plus log-normal shares of the rest."""
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=num_clients)
    spare = n - min_size * num_clients
    shares = weights / weights.sum() * spare
    sizes = np.floor(shares).astype(np.int64)
    leftover = spare - int(sizes.sum())
    if leftover > 0:
        order = np.argsort(-(shares - sizes), kind="stable")
        sizes[order[:leftover]] += 1
    return sizes + min_size


@PARTITIONERS.register("quantity")
def quantity(
    labels: np.ndarray,
    num_clients: int,
    num_classes: int,
    seed: int,
    sigma: float = 1.0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Quantity-skewed split: IID labels, client sizes drawn from a log-normal distribution.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the pool.
    num_clients, num_classes : int
        Number of clients and of classes.
    seed : int
        Seed of the sizes and of the shuffle.
    sigma : float
        Log-normal sigma, >= 0; 0 gives near-equal sizes.
    min_size : int
        Minimum number of samples per client.

    Returns
    -------
    list of numpy.ndarray
        One sorted index array per client.

    Raises
    ------
    ScenarioError
        For a negative ``sigma`` or a ``min_size`` the pool cannot satisfy.
    """
    labels = _check_inputs(labels, num_clients, num_classes)
    if not _is_number(sigma) or not 0.0 <= float(sigma) < math.inf:
        raise ScenarioError("partition.params.sigma", sigma, "a finite number >= 0")
    min_size = _check_int_param("min_size", min_size, 0)
    if min_size * num_clients > labels.size:
        raise ScenarioError(
            "partition.params.min_size",
            min_size,
            f"at most {labels.size // num_clients} ({labels.size} samples, {num_clients} clients)",
        )
    rng = np.random.default_rng(seed)
    sizes = _lognormal_sizes(labels.size, num_clients, float(sigma), min_size, rng)
    perm = rng.permutation(labels.size)
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


# ----------------------------------------------------------------------------- local test


def _stratified_quota(class_sizes: np.ndarray, n_test: int) -> np.ndarray:
    """Per-class test counts summing to ``n_test``, proportional to ``class_sizes``.

    Largest-remainder rounding (ties to the lower class id): each class gets the floor of
    its share, and the classes with the largest fractional parts get one more.
    """
    n = int(class_sizes.sum())
    ideal = class_sizes * (n_test / n)
    quota = np.floor(ideal).astype(np.int64)
    order = np.argsort(-(ideal - quota), kind="stable")
    quota[order[: n_test - int(quota.sum())]] += 1
    return quota


def local_test_size(n: int, fraction: float) -> int:
    """Samples of an ``n``-sample client that go to its local test split.

    ``round(fraction * n)`` (halves up), at least one when ``fraction > 0``, and never all:
    a client keeps at least one training sample, so a one-sample client has no local test.
    """
    if fraction <= 0.0 or n < 2:
        return 0
    return min(n - 1, max(1, int(math.floor(fraction * n + 0.5))))


def split_local_test(
    labels: np.ndarray, parts: list[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's samples into its training part and a local test split.

    The split is stratified by label, so the local test split follows the client's own
    label distribution: client ``c`` holding ``n`` samples, ``n_k`` of class ``k``, puts
    :func:`local_test_size` ``(n, fraction)`` samples in its test split, split over classes
    by largest-remainder rounding of ``n_test * n_k / n``, each class's samples drawn
    uniformly with ``np.random.default_rng([seed, LOCAL_TEST_STREAM, c])``.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the pool.
    parts : list of numpy.ndarray
        Each client's indices into the pool (from a partitioner).
    fraction : float
        Share of each client's samples held out, in [0, 1); 0 returns ``parts`` unchanged
        and empty test splits.
    seed : int
        Scenario seed.

    Returns
    -------
    tuple of (list of numpy.ndarray, list of numpy.ndarray)
        Sorted int64 training and test indices per client; for each client the two are
        disjoint and their union is its part.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise ScenarioError("data.local_test_fraction", fraction, "a number in [0, 1)")
    empty = np.zeros(0, dtype=np.int64)
    if fraction == 0.0:
        return _finish(parts), [empty.copy() for _ in parts]
    train, test = [], []
    for cid, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        n_test = local_test_size(len(part), fraction)
        if n_test == 0:
            train.append(np.sort(part))
            test.append(empty.copy())
            continue
        rng = np.random.default_rng([seed, LOCAL_TEST_STREAM, cid])
        classes, sizes = np.unique(labels[part], return_counts=True)
        chosen = [rng.permutation(part[labels[part] == k])[:q]
                  for k, q in zip(classes, _stratified_quota(sizes, n_test), strict=True)]
        held = np.sort(np.concatenate(chosen))
        test.append(held)
        train.append(np.setdiff1d(part, held))
    return train, test


#: Seed stream of :func:`split_local_test` (keeps its draws apart from the partitioners').
LOCAL_TEST_STREAM = 0x10CA1


# ----------------------------------------------------------------------------- statistics


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client label histogram.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer labels of the pool.
    parts : list of numpy.ndarray
        Index arrays, one per client.
    num_classes : int
        Number of classes.

    Returns
    -------
    numpy.ndarray
        Int64 matrix of shape ``(len(parts), num_classes)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for row, idx in enumerate(parts):
        counts[row] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return counts


def skew(counts: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    Parameters
    ----------
    counts : numpy.ndarray
        Clients x classes count matrix from :func:`class_counts`.

    Returns
    -------
    float
        0 for identical distributions, up to 1 for disjoint ones; empty clients are ignored.
    """
    counts = np.asarray(counts, dtype=np.float64)
    sizes = counts.sum(axis=1)
    if sizes.sum() == 0:
        return 0.0
    global_dist = counts.sum(axis=0) / sizes.sum()
    nonempty = counts[sizes > 0] / sizes[sizes > 0, None]
    return float(np.mean(0.5 * np.abs(nonempty - global_dist).sum(axis=1)))
