"""Checkpoints: saved as tensors and plain data, and a killed run resumed gives the same run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedkd.checkpoint import from_safe, load_strategy_state, strategy_state, to_safe
from strategies.fedavg import NodeInfo

ROOT = Path(__file__).resolve().parents[1]
WALL = {"wall_s", "elapsed_s"}


class Toy:
    """A strategy-like object: config, records, a lazily built module and its optimizer."""

    def __init__(self) -> None:
        self.seed = 3
        self.log: dict[int, list[dict[str, float]]] = {}
        self.info = NodeInfo(node_id=5, cid=1, arch="mlp", num_examples=9, label_counts=(1, 2))
        self.current = {"mlp": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})}
        self._net: torch.nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.rng = torch.Generator().manual_seed(0)
        self.fn = lambda x: x  # callables are not state

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            self._net = torch.nn.Linear(2, 2)
            self.opt = torch.optim.Adam(self._net.parameters(), lr=0.1)
        return self._net


def test_strategy_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    toy = Toy()
    toy.log[2] = [{"client": 1, "weight": 0.5}]
    out = toy.net(torch.ones(1, 2)).sum()
    out.backward()
    assert toy.opt is not None
    toy.opt.step()
    toy.rng.manual_seed(7)
    torch.save(strategy_state(toy), tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    fresh = Toy()
    load_strategy_state(fresh, saved)
    assert fresh.log == {2: [{"client": 1, "weight": 0.5}]} and fresh.info == toy.info
    assert np.array_equal(fresh.current["mlp"]["w"].numpy(), np.arange(3))
    assert fresh._net is not None and torch.equal(fresh._net.weight, toy.net.weight)
    assert fresh.opt is not None and fresh.opt.state_dict()["state"][0]["step"] == 1
    assert torch.equal(fresh.rng.get_state(), toy.rng.get_state())
    assert "fn" not in saved


def test_records_from_outside_fedkd_are_refused() -> None:
    @dataclass
    class Elsewhere:
        x: int = 1

    safe = to_safe(Elsewhere())
    safe["cls"] = "os:system"
    with pytest.raises(ValueError, match="outside fedkd"):
        from_safe(safe, None)


def _simulate(out: Path, strategy: str, *extra: str, engine: str = "ray",
              ) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "fedkd.cli", "simulate", "--no-progress", *extra]
    if "--resume" not in extra:
        args += ["scenarios/quickstart.yaml", "--run-dir", str(out), "--set", "rounds=4",
                 "--set", "checkpoint_every=1", "--set", "clients.num=4", "--set",
                 f"strategy.name={strategy}", "--set", "clients.train.epochs=1",
                 "--set", f"engine.name={engine}"]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _rows(run: Path, name: str) -> list[dict]:
    path = run / name
    if not path.exists():
        return []
    return [{k: v for k, v in r.items() if k not in WALL} for r in pq.read_table(path).to_pylist()]


def _checkpoint_round(run: Path) -> int:
    path = run / "checkpoint" / "state.pt"
    return int(torch.load(path, weights_only=True)["round"]) if path.exists() else 0


# FedGen (server generator and optimizer) on the inline engine in the default run; the others,
# on Ray, in the slow set
STRATEGIES = [pytest.param("fedgen", "inline"),
              pytest.param("fedmd", "ray", marks=pytest.mark.slow),
              pytest.param("fedavg", "ray", marks=pytest.mark.slow),
              pytest.param("feddf", "ray", marks=pytest.mark.slow),
              pytest.param("peer_kd", "ray", marks=pytest.mark.slow)]


@pytest.mark.parametrize(("strategy", "engine"), STRATEGIES)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, strategy: str,
                                                         engine: str) -> None:
    whole = _simulate(tmp_path / "whole", strategy, engine=engine)
    killed = _simulate(tmp_path / "killed", strategy, engine=engine)  # both at once
    deadline = time.monotonic() + 600
    while _checkpoint_round(tmp_path / "killed") < 2:
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(killed.pid, signal.SIGKILL)  # the driver and every Ray process it started
    killed.wait(timeout=60)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:] if whole.stderr else ""
    summary = tmp_path / "killed" / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["rounds"] < 4
    resumed = _simulate(tmp_path / "killed", strategy, "--resume", str(tmp_path / "killed"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:] if resumed.stderr else ""
    for name in ("metrics.parquet", "clients.parquet", "teachers.parquet", "edges.parquet"):
        assert _rows(tmp_path / "killed", name) == _rows(tmp_path / "whole", name), name
    assert json.loads(summary.read_text())["status"] == "completed"


@pytest.mark.slow
def test_state_actor_checkpoints_and_resumes(tmp_path: Path) -> None:
    """DML's private models live in the state actor: checkpoints copy them to disk, a resumed
    run puts them into a new actor, and the records equal an uninterrupted run's."""
    actor = ("--set", "engine.state_store=actor")
    whole = _simulate(tmp_path / "whole", "dml", *actor)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-2000:] if whole.stderr else ""
    killed = _simulate(tmp_path / "killed", "dml", *actor)
    deadline = time.monotonic() + 600
    while _checkpoint_round(tmp_path / "killed") < 2:
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert (tmp_path / "killed" / "checkpoint" / "clients" / "model").is_dir()
    resumed = _simulate(tmp_path / "killed", "dml", "--resume", str(tmp_path / "killed"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:] if resumed.stderr else ""
    for name in ("metrics.parquet", "clients.parquet", "teachers.parquet"):
        assert _rows(tmp_path / "killed", name) == _rows(tmp_path / "whole", name), name
    assert not (tmp_path / "killed" / "state").exists()  # the states went back to the actor


def test_resume_needs_a_checkpoint_and_nothing_else(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from fedkd.cli import main

    (tmp_path / "scenario.yaml").write_text("rounds: 2\n")
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert "--resume: got" in capsys.readouterr().err
    assert main(["simulate", "s.yaml", "--resume", str(tmp_path)]) == 2
    assert "a run folder alone" in capsys.readouterr().err


def test_copy_store_copies_every_client_key(tmp_path: Path) -> None:
    from fedkd.state import StateStore, copy_store

    src, dst = StateStore(tmp_path / "a"), StateStore(tmp_path / "b")
    assert src.keys() == []
    src.save(3, "model", {"w": torch.ones(2)})
    src.save(1, "model", {"w": torch.zeros(2)})
    src.save(1, "residual", {"r": torch.full((3,), 2.0)})
    assert copy_store(src, dst) == 3
    assert dst.keys() == [(1, "model"), (1, "residual"), (3, "model")]
    assert torch.equal(dst.load(1, "residual")["r"], torch.full((3,), 2.0))
