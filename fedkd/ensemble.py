"""The server-side teacher ensemble: many client models' logits on proxy or generated batches.

In-process by default; with ``actors > 0`` (``server.teacher_actors``) and Ray running, the
teachers are split across Ray actors that compute their logits in parallel and return them in
teacher order, with the same results as in-process. Algorithms that need gradients through the
teachers (FedGen's heads, FedFTG's generator) use :meth:`TeacherEnsemble.modules` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from fedkd.models import build_model
from fedkd.train import predict


@dataclass(frozen=True)
class ModelSpace:
    """How to build any architecture of a run: input shape, classes, per-arch params."""

    input_shape: tuple[int, ...]
    num_classes: int
    params: dict[str, dict[str, Any]]
    device: str = "cpu"

    def build(self, arch: str, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A model of ``arch``, loaded with ``state`` when given, in eval mode, on
        :attr:`device`."""
        model = build_model(arch, self.input_shape, self.num_classes, seed=0,
                            **self.params.get(arch, {}))
        if state is not None:
            model.load_state_dict(state)
        return model.to(self.device).eval()


@dataclass(frozen=True)
class Teacher:
    """One client model acting as a teacher."""

    cid: int
    arch: str
    state: dict[str, torch.Tensor]


def _logits(space: ModelSpace, teachers: Sequence[Teacher], x: torch.Tensor,
            batch_size: int) -> torch.Tensor:
    return torch.stack([predict(space.build(t.arch, t.state), x, batch_size) for t in teachers])


class _TeacherWorker:
    """Ray actor body: computes its share of the teachers' logits."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)

    def logits(self, space: ModelSpace, teachers: list[Teacher], x: torch.Tensor,
               batch_size: int) -> torch.Tensor:
        # teacher actors hold no GPU (zero resources reserved): they compute on the CPU
        return _logits(replace(space, device="cpu"), teachers, x, batch_size)


class TeacherEnsemble:
    """K teachers whose logits are computed in-process or on Ray actors.

    Parameters
    ----------
    space : ModelSpace
        How to build each teacher's architecture.
    teachers : Sequence[Teacher]
        The teachers, in the order their logits are returned.
    actors : int
        Ray actors to spread the teachers over (0: in-process).
    batch_size : int
        Inference batch size.
    """

    _pool: list[Any] = []

    def __init__(self, space: ModelSpace, teachers: Sequence[Teacher], actors: int = 0,
                 batch_size: int = 1024) -> None:
        self.space = space
        self.teachers = list(teachers)
        self.actors = actors
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.teachers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, N, C)`` logits of every teacher on ``x`` (eval mode, no gradient)."""
        pool = self._workers()
        if not pool:
            return _logits(self.space, self.teachers, x, self.batch_size)
        import ray

        shares = [self.teachers[i::len(pool)] for i in range(len(pool))]
        x_ref = ray.put(x)
        parts = ray.get([w.logits.remote(self.space, s, x_ref, self.batch_size)
                         for w, s in zip(pool, shares, strict=True) if s])
        out = torch.empty(len(self.teachers), *parts[0].shape[1:], dtype=parts[0].dtype)
        for i, part in enumerate(parts):
            out[i::len(pool)] = part
        return out

    def modules(self) -> list[nn.Module]:
        """The teachers as in-process modules (eval mode), for gradient-based uses."""
        return [self.space.build(t.arch, t.state) for t in self.teachers]

    def _workers(self) -> list[Any]:
        if self.actors <= 0:
            return []
        try:
            import ray
        except ImportError:  # pragma: no cover - ray ships with flwr[simulation]
            return []
        if not ray.is_initialized():
            return []
        pool = TeacherEnsemble._pool
        if len(pool) < self.actors:
            # zero CPUs reserved: teachers run while the client actors (holding the CPUs) idle
            remote = ray.remote(num_cpus=0)(_TeacherWorker)
            pool.extend(remote.remote(threads=1) for _ in range(self.actors - len(pool)))
        return pool[: min(self.actors, len(self.teachers))]

    @classmethod
    def shutdown(cls) -> None:
        """Forget the actor pool (Ray's shutdown kills the actors)."""
        cls._pool = []
