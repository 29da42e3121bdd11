"""Carve a loaded dataset into the client pool, the server's labeled splits and public set.

One seeded permutation of the train split is cut, in this order, into the validation split
(``val_fraction``), the public set (``public_fraction``), the weighting split
(``weight_fraction``) and the client pool (the rest). A fraction of 0 takes nothing, so
adding a split with fraction 0 leaves every other split, and the partition, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedkd.data.base import LoadedDataset, TensorSplit
from fedkd.errors import ScenarioError


@dataclass(frozen=True)
class DataBundle:
    """Every split a federated run needs.

    Attributes
    ----------
    pool : TensorSplit
        Client training pool, the samples partitioners split among clients.
    test : TensorSplit
        Global test set.
    val : TensorSplit or None
        Server validation split held out from the train set (early stopping).
    public : TensorSplit or None
        Public/proxy set for distillation. Its labels are kept in the tensor, but strategies
        may use them only when ``public_labeled`` is true.
    public_labeled : bool
        Whether strategies may read the public labels.
    num_classes : int
        Number of classes of the private task.
    input_shape : tuple of int
        Shape of one sample.
    name : str
        Name of the private dataset.
    weight : TensorSplit or None
        Labeled server split on which label-using teacher weightings fit, disjoint from
        ``val`` (None: they fit on ``val``; see :func:`strategies.weighting.weighting_split`).
    public_truth : bool
        Whether ``public.y`` are true labels of the private task (a held-out part of its
        train set, or a labeled public dataset): the teacher diagnostics and the ``oracle``
        weighting measure against them even when strategies may not read them.
    """

    pool: TensorSplit
    test: TensorSplit
    val: TensorSplit | None
    public: TensorSplit | None
    public_labeled: bool
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    weight: TensorSplit | None = None
    public_truth: bool = False

    def public_truth_labels(self, index: torch.Tensor | None = None) -> torch.Tensor | None:
        """True labels of the public samples (``index``: a subset), None when unknown."""
        if self.public is None or not self.public_truth:
            return None
        return self.public.y if index is None else self.public.y[index]


def _check_fraction(path: str, value: float) -> float:
    """Return ``value`` if it is a number in [0, 1), else raise a ScenarioError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ScenarioError(path, value, "a number in [0, 1)")
    if not 0.0 <= float(value) < 1.0:
        raise ScenarioError(path, value, "a number in [0, 1)")
    return float(value)


def _count(fraction: float, n: int) -> int:
    """Samples taken by ``fraction`` of ``n`` (at least one when the fraction is positive)."""
    if fraction <= 0.0:
        return 0
    return max(1, int(round(fraction * n)))


def _held_out(
    n: int,
    val_fraction: float,
    public_fraction: float,
    rng: np.random.Generator,
    weight_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint sorted index arrays (val, public, weight, pool) covering ``range(n)``.

    One permutation is cut in that order, so a zero ``weight_fraction`` leaves val, public
    and pool exactly as without it.
    """
    sizes = [_count(val_fraction, n), _count(public_fraction, n), _count(weight_fraction, n)]
    if sum(sizes) >= n:
        raise ScenarioError(
            "data.val_fraction",
            val_fraction,
            f"fractions leaving training samples (val + public + weight take {sum(sizes)} "
            f"of {n})",
        )
    perm = rng.permutation(n)
    val, pub, weight, pool = np.split(perm, np.cumsum(sizes))
    return np.sort(val), np.sort(pub), np.sort(weight), np.sort(pool)


def _external_public(
    dataset: LoadedDataset,
    public_dataset: LoadedDataset,
    public_size: int | None,
    public_labeled: bool,
    rng: np.random.Generator,
) -> TensorSplit:
    """The public set drawn from another dataset's train split."""
    if tuple(public_dataset.input_shape) != tuple(dataset.input_shape):
        raise ValueError(
            f"public dataset {public_dataset.name!r} has input shape {public_dataset.input_shape}"
            f" but {dataset.name!r} has {dataset.input_shape}"
        )
    if public_labeled and public_dataset.num_classes != dataset.num_classes:
        raise ValueError(
            f"public dataset {public_dataset.name!r} has {public_dataset.num_classes} classes, "
            f"{dataset.name!r} has {dataset.num_classes}: its labels cannot be used"
        )
    n = len(public_dataset.train)
    if public_size is None:
        return public_dataset.train
    if isinstance(public_size, bool) or not isinstance(public_size, (int, np.integer)):
        raise ValueError(f"public_size must be an integer, got {public_size!r}")
    if not 1 <= int(public_size) <= n:
        raise ValueError(f"public_size must be in [1, {n}], got {public_size}")
    return public_dataset.train.subset(rng.permutation(n)[: int(public_size)])


def build_bundle(
    dataset: LoadedDataset,
    *,
    seed: int,
    val_fraction: float = 0.0,
    public_fraction: float = 0.0,
    public_labeled: bool = False,
    public_dataset: LoadedDataset | None = None,
    public_size: int | None = None,
    weight_fraction: float = 0.0,
) -> DataBundle:
    """Split ``dataset`` into pool, validation, public and weighting sets.

    Parameters
    ----------
    dataset : LoadedDataset
        The private task.
    seed : int
        Seed of the permutations; the same seed gives an identical bundle.
    val_fraction : float
        Fraction of the train split held out for server validation (taken first).
    public_fraction : float
        Fraction of the train split held out as the public set (taken after validation).
        Must be 0 when ``public_dataset`` is given.
    public_labeled : bool
        Whether strategies may use the public labels.
    public_dataset : LoadedDataset or None
        Another dataset whose train split supplies the public set (e.g. CIFAR-100 for CIFAR-10).
    public_size : int or None
        With ``public_dataset``: keep only the first ``public_size`` samples of a seeded
        permutation of its train split.
    weight_fraction : float
        Fraction of the train split held out as the labeled weighting split (taken after
        the public set; 0: none, and every other split is as without it).

    Returns
    -------
    DataBundle
        The splits; ``val``/``public``/``weight`` are None when not requested.

    Raises
    ------
    ScenarioError
        For fractions outside [0, 1) or leaving no pool samples.
    ValueError
        When the public dataset's input shape differs from the private one.
    """
    val_fraction = _check_fraction("data.val_fraction", val_fraction)
    public_fraction = _check_fraction("data.public_fraction", public_fraction)
    weight_fraction = _check_fraction("data.weight_fraction", weight_fraction)
    if public_dataset is not None and public_fraction > 0.0:
        raise ScenarioError(
            "data.public_fraction", public_fraction, "0 when a separate public dataset is given"
        )
    rng = np.random.default_rng(seed)
    val_idx, pub_idx, weight_idx, pool_idx = _held_out(
        len(dataset.train), val_fraction, public_fraction, rng, weight_fraction)
    public: TensorSplit | None = None
    if public_dataset is not None:
        public = _external_public(dataset, public_dataset, public_size, public_labeled, rng)
    elif len(pub_idx) > 0:
        public = dataset.train.subset(pub_idx)
    return DataBundle(
        pool=dataset.train.subset(pool_idx),
        test=dataset.test,
        val=dataset.train.subset(val_idx) if len(val_idx) > 0 else None,
        public=public,
        public_labeled=bool(public_labeled),
        num_classes=dataset.num_classes,
        input_shape=tuple(dataset.input_shape),
        name=dataset.name,
        weight=dataset.train.subset(weight_idx) if len(weight_idx) > 0 else None,
        public_truth=public is not None and (public_dataset is None or bool(public_labeled)),
    )
