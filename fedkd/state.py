"""Per-client persistent state (models, counters) kept outside Flower messages.

Stateful algorithms (FedMD, DML/FML peers) keep each client's private model between rounds.
Flower ships ``Context.state`` with every message, which is slow for large state, so fedkd
stores it on disk in the run folder instead: one file per client and key, written
atomically and read back with ``torch.load(weights_only=True)``. The store is shared by every
worker that sees the run folder, whichever engine or actor runs the client.
"""

from __future__ import annotations

import os
from pathlib import Path

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
