"""Checkpoints of a run, and resuming from one.

Every ``checkpoint_every`` rounds the runner writes ``<run>/checkpoint/``, atomically (a new
folder renamed over the old one):

- ``state.pt``: the round, the global arrays, the strategy's server state, the byte counts
  (what a budget has spent), the virtual clock and the RNG states, saved as tensors and
  plain containers only, so ``torch.load(weights_only=True)`` reads it;
- ``clients/``: a copy of the clients' state store (private models, error-feedback
  residuals) as it was after that round, on disk whatever ``engine.state_store`` is (a
  run whose state lives in the state actor gets it back into a new actor when it resumes).

The strategy's state is its attributes, walked generically: numbers, strings, containers,
tensors, NumPy arrays, ArrayRecords, dataclass records, and the state dicts of its modules,
optimizers, LR schedulers and torch generators. The world, the server-side data it derives
from it and the teacher weighting are rebuilt from the scenario instead (a weighting that learns
across rounds, ``kt_pfl``, also saves its ``state_dict``); the teacher log is not saved, its
rows are already in the records. A module built on
first use (``_x`` behind a property ``x``) is built before its state is loaded.

``fedkd simulate --resume RUN_DIR`` rebuilds the run from ``RUN_DIR/scenario.yaml``, loads
the checkpoint, cuts the records back to its round and runs the remaining rounds: the final
records equal an uninterrupted run's, wall-clock columns aside.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

#: Strategy attributes rebuilt from the scenario, never saved (``nodes``: the handshake is
#: repeated, as node ids may differ between engines).
REBUILT = {"world", "server", "weigh", "strategy", "nodes", "_by_node", "teacher_log"}
TAG = "__fedkd__"


def to_safe(value: Any) -> Any:
    """``value`` as tensors and plain containers (``None`` where it cannot be saved)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return {TAG: "ndarray", "v": torch.from_numpy(np.array(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, ArrayRecord):
        return {TAG: "arrays", "v": {k: torch.from_numpy(np.array(a.numpy()))
                                     for k, a in value.items()}}
    if isinstance(value, nn.Module):
        return {TAG: "module", "v": {k: v.detach().cpu().clone()
                                     for k, v in value.state_dict().items()}}
    if isinstance(value, torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler):
        return {TAG: "stateful", "v": to_safe(value.state_dict())}
    if isinstance(value, torch.Generator):
        return {TAG: "generator", "v": value.get_state()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {TAG: "record", "cls": f"{cls.__module__}:{cls.__qualname__}",
                "v": {f.name: to_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {TAG: "dict", "v": [[to_safe(k), to_safe(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return {TAG: type(value).__name__, "v": [to_safe(v) for v in value]}
    return None


def from_safe(saved: Any, current: Any) -> Any:
    """The value ``saved`` stands for, loaded into ``current`` where that is stateful."""
    if not isinstance(saved, dict) or TAG not in saved:
        return saved
    kind, v = saved[TAG], saved["v"]
    if kind == "ndarray":
        return v.numpy()
    if kind == "arrays":
        return ArrayRecord({k: Array(t.numpy()) for k, t in v.items()})
    if kind in ("module", "stateful"):
        if current is None:
            raise ValueError("no object to load the saved state into")
        current.load_state_dict(v if kind == "module" else from_safe(v, None))
        return current
    if kind == "generator":
        gen = current if isinstance(current, torch.Generator) else torch.Generator()
        gen.set_state(v)
        return gen
    if kind == "record":
        return _record_class(saved["cls"])(**{k: from_safe(x, None) for k, x in v.items()})
    if kind == "dict":
        cur = current if isinstance(current, dict) else {}
        return {_key(from_safe(k, None)): from_safe(x, cur.get(_key(from_safe(k, None))))
                for k, x in v}
    items = [from_safe(x, None) for x in v]
    return tuple(items) if kind == "tuple" else items


def _record_class(name: str) -> type:
    """A dataclass of fedkd's own packages, by ``module:qualname`` (nothing else is built)."""
    module, _, qualname = name.partition(":")
    if module.split(".")[0] not in ("fedkd", "strategies") or "." in qualname:
        raise ValueError(f"checkpoint names a record class outside fedkd: {name}")
    cls = getattr(importlib.import_module(module), qualname)
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"checkpoint names a class that is not a record: {name}")
    return cls


def _key(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's (and a wrapped strategy's) attributes, as saveable data."""
    out: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if name in REBUILT or callable(value) and not isinstance(value, nn.Module):
            continue
        safe = to_safe(value)
        if safe is not None or value is None:
            out[name] = safe
    inner = vars(strategy).get("strategy")
    if inner is not None:
        out[f"{TAG}inner"] = strategy_state(inner)
    weigh = vars(strategy).get("weigh")
    if hasattr(weigh, "state_dict"):  # a weighting that learns across rounds (kt_pfl)
        out[f"{TAG}weigh"] = to_safe(weigh.state_dict())
    return out


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    """Restore what :func:`strategy_state` saved into a freshly built, bound strategy."""
    inner = state.get(f"{TAG}inner")
    if inner is not None:
        load_strategy_state(vars(strategy)["strategy"], inner)
    if f"{TAG}weigh" in state:
        vars(strategy)["weigh"].load_state_dict(from_safe(state[f"{TAG}weigh"], None))
    for name, saved in state.items():
        if name.startswith(TAG):
            continue
        current = vars(strategy).get(name)
        if current is None and _is_stateful(saved) and name.startswith("_"):
            getattr(strategy, name[1:])  # build the lazily built object behind its property
            current = vars(strategy).get(name)
        if current is None and _is_stateful(saved):
            continue  # built later together with its owner (e.g. an optimizer's module)
        setattr(strategy, name, from_safe(saved, current))


def _is_stateful(saved: Any) -> bool:
    return isinstance(saved, dict) and saved.get(TAG) in ("module", "stateful")


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch, NumPy and Python."""
    kind, keys, pos, gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_meta": [str(kind), int(pos), int(gauss), float(cached)],
            "python": to_safe(random.getstate())}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, pos, gauss, cached = state["numpy_meta"]
    np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), pos, gauss, cached))
    py = from_safe(state["python"], None)
    random.setstate((py[0], tuple(py[1]), py[2]))


def save(run_dir: Path, state: dict[str, Any], store: Any = None) -> None:
    """Write ``<run>/checkpoint/`` atomically: ``state.pt`` and a copy of the client states
    (of ``store`` when it is not the run folder's disk store, e.g. the state actor)."""
    from fedkd.state import StateStore, copy_store

    final = run_dir / "checkpoint"
    tmp = run_dir / ".checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    clients = run_dir / "state"
    if store is not None and not isinstance(store, StateStore):
        copy_store(store, StateStore(tmp / "clients"))
    elif clients.exists():
        shutil.copytree(clients, tmp / "clients")
    old = run_dir / ".checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load(run_dir: Path) -> dict[str, Any]:
    """Read ``<run>/checkpoint/state.pt`` (``weights_only=True``) and put the client states
    back as they were at that round."""
    path = run_dir / "checkpoint" / "state.pt"
    state = torch.load(path, weights_only=True)
    clients = run_dir / "state"
    shutil.rmtree(clients, ignore_errors=True)
    if (run_dir / "checkpoint" / "clients").exists():
        shutil.copytree(run_dir / "checkpoint" / "clients", clients)
    return state
