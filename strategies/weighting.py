"""Multi-teacher weighting: one plug that every ensemble in fedkd takes its weights from.

A weighting turns the teachers' logits on a batch, plus what the server knows about the
teachers (sample counts, per-class label counts, validation scores), into per-sample,
per-teacher weights ``w[n, k]`` whose rows sum to 1. FedDF's ensemble, FedMD's consensus,
FedGen's and FedFTG's generator ensembles and DML's peer targets all call one.

Add a weighting by registering a class with ``@WEIGHTINGS.register("name")`` whose
constructor keyword arguments are its YAML params; strategies take
``weighting: name`` and ``weighting_params: {...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedkd.registry import Registry


@dataclass(frozen=True)
class TeacherContext:
    """What the server knows about K teachers besides their outputs.

    Attributes
    ----------
    num_examples : torch.Tensor
        ``(K,)`` training-set sizes.
    label_counts : torch.Tensor
        ``(K, C)`` training label counts.
    val_scores : torch.Tensor, optional
        ``(K,)`` accuracy of each teacher on the server validation split.
    """

    num_examples: torch.Tensor
    label_counts: torch.Tensor
    val_scores: torch.Tensor | None = None

    @property
    def num_teachers(self) -> int:
        """K."""
        return len(self.num_examples)


class Weighting(Protocol):
    """Turns ``(K, N, C)`` teacher logits into ``(N, K)`` weights (rows sum to 1)."""

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor: ...


WEIGHTINGS: Registry[Any] = Registry("weighting")


@WEIGHTINGS.register("uniform")
class Uniform:
    """Every teacher weighs ``1/K`` on every sample."""

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        k, n = logits.shape[0], logits.shape[1]
        return torch.full((n, k), 1.0 / k, dtype=logits.dtype)


def make_weighting(name: str = "uniform", params: Mapping[str, Any] | None = None,
                   path: str = "strategy.params.weighting") -> Weighting:
    """Instantiate the weighting registered as ``name`` with its params."""
    from fedkd.scenario import check_kwargs

    cls = WEIGHTINGS.get(name, path)
    params = dict(params or {})
    check_kwargs(cls, params, path.rsplit(".", 1)[0] + ".weighting_params")
    return cls(**params)


def class_weights(label_counts: torch.Tensor) -> torch.Tensor:
    """``w[y, k] = n_k(y) / n(y)`` (FedGen/FedFTG); a class nobody holds is uniform.

    Parameters
    ----------
    label_counts : torch.Tensor
        ``(K, C)`` label counts of K teachers.

    Returns
    -------
    torch.Tensor
        ``(C, K)`` weights whose rows sum to 1.
    """
    counts = label_counts.to(torch.float64).T
    total = counts.sum(dim=1, keepdim=True)
    k = counts.shape[1]
    return torch.where(total > 0, counts / total.clamp_min(1), torch.full_like(counts, 1 / k))
