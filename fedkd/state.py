"""Per-client persistent state (models, counters) kept outside Flower messages.

Stateful algorithms (FedMD, DML/FML peers, error-feedback codecs) keep each client's state
between rounds. Flower ships ``Context.state`` with every message, which is slow for large
state, so fedkd keeps it in a store, chosen by ``engine.state_store``:

- ``disk`` (default), :class:`StateStore`: one file per client and key in the run folder,
  written atomically and read back with ``torch.load(weights_only=True)``; shared by every
  worker that sees the run folder (one machine, or a cluster with a shared filesystem);
- ``actor``, :class:`ActorStateStore`: a named Ray actor that keeps each value in Ray's
  object store (which spills to disk under memory pressure); any node of a Ray cluster
  reaches it, so no shared filesystem is needed. The driver starts it for the run
  (:func:`start_state_actor`) and stops it after.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch


class StateStore:
    """A directory of per-client tensor dictionaries.

    Parameters
    ----------
    root : str or Path
        Directory holding ``<key>/<client>.pt`` files.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, cid: int, key: str) -> Path:
        return self.root / key / f"{cid}.pt"

    def load(self, cid: int, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved for ``(cid, key)``, or None when nothing was saved."""
        path = self._path(cid, key)
        if not path.exists():
            return None
        return torch.load(path, weights_only=True)

    def save(self, cid: int, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save ``tensors`` for ``(cid, key)``, replacing any earlier value atomically."""
        path = self._path(cid, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)

    def keys(self) -> list[tuple[int, str]]:
        """Every ``(client, key)`` saved so far, sorted."""
        if not self.root.is_dir():
            return []
        return sorted((int(f.stem), d.name) for d in self.root.iterdir() if d.is_dir()
                      for f in d.glob("*.pt"))


def copy_store(src: StateStore | ActorStateStore, dst: StateStore | ActorStateStore) -> int:
    """Copy every saved ``(client, key)`` of ``src`` into ``dst``; returns how many.

    Checkpoints keep a run's client states on disk whatever its store; resuming a run whose
    state lives in the state actor puts them back into a new actor.
    """
    keys = src.keys()
    for cid, key in keys:
        tensors = src.load(cid, key)
        if tensors is not None:
            dst.save(cid, key, tensors)
    return len(keys)


def state_actor_name(run_dir: str) -> str:
    """The name of a run's state actor (one per run folder)."""
    return "fedkd-state-" + hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]


class _StateHolder:
    """Ray actor body: ``(client, key) -> ObjectRef`` of the saved tensors.

    The actor puts every value into the object store itself, so it owns the objects (they
    outlive the client worker that saved them) and Ray may spill them to disk.
    """

    def __init__(self) -> None:
        self.refs: dict[tuple[int, str], Any] = {}

    def put(self, cid: int, key: str, tensors: dict[str, torch.Tensor]) -> None:
        import ray

        self.refs[(cid, key)] = ray.put(tensors)

    def get(self, cid: int, key: str) -> list[Any]:
        ref = self.refs.get((cid, key))
        return [] if ref is None else [ref]  # in a list: Ray passes the reference, not its value

    def keys(self) -> list[tuple[int, str]]:
        return sorted(self.refs)


def start_state_actor(run_dir: str) -> Any:
    """Start the run's state actor (zero CPUs; Ray must be initialised); returns its handle."""
    import ray

    return ray.remote(num_cpus=0)(_StateHolder).options(name=state_actor_name(run_dir)).remote()


class ActorStateStore:
    """Per-client tensor dictionaries held by the run's state actor (:func:`start_state_actor`).

    Parameters
    ----------
    run_dir : str
        The run folder, which names the actor.
    """

    def __init__(self, run_dir: str) -> None:
        self.name = state_actor_name(run_dir)
        self._handle: tuple[str, Any] | None = None

    def _actor(self) -> Any:
        """The state actor's handle, looked up once per Ray job (a lookup asks Ray's
        control store; a later run in this process is a new job with a new actor)."""
        import ray

        job = ray.get_runtime_context().get_job_id()
        if self._handle is None or self._handle[0] != job:
            self._handle = (job, ray.get_actor(self.name))
        return self._handle[1]

    def load(self, cid: int, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved for ``(cid, key)``, or None when nothing was saved."""
        import ray

        found = ray.get(self._actor().get.remote(cid, key))
        return ray.get(found[0]) if found else None

    def save(self, cid: int, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save ``tensors`` for ``(cid, key)``, replacing any earlier value."""
        import ray

        ray.get(self._actor().put.remote(cid, key, {k: v.detach().cpu()
                                                     for k, v in tensors.items()}))

    def keys(self) -> list[tuple[int, str]]:
        """Every ``(client, key)`` saved so far, sorted."""
        import ray

        return [tuple(k) for k in ray.get(self._actor().keys.remote())]  # type: ignore[misc]

