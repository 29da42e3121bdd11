"""A sweep validates each grid point as the whole combination of its overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedkd.errors import ScenarioError
from fedkd.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")
ACROSS = ["strategy.name=feddf,fedmd", "strategy.params.weighting=uniform,entropy"]


def test_a_bad_combination_names_its_grid_point(tmp_path: Path) -> None:
    """fedavg takes no weighting: the point (fedavg, entropy) is reported before any run."""
    with pytest.raises(ScenarioError) as info:
        sweep(QUICKSTART, ["strategy.name=feddf,fedavg", "strategy.params.weighting=entropy"],
              "0", out=str(tmp_path / "s"), progress=False)
    assert info.value.path == ("grid point strategy.name=fedavg,strategy.params.weighting="
                               "entropy: strategy.params.weighting")
    assert not any((tmp_path / "s").rglob("summary.json"))


def test_sweep_of_strategies_by_weightings(tmp_path: Path) -> None:
    """The study the sweep exists for: one weighting across several distillation algorithms."""
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "fedkd.cli", "sweep", "scenarios/quickstart.yaml",
            "--grid", ACROSS[0], "--grid", ACROSS[1], "--seeds", "0", "--out", str(out),
            "--no-progress", "--parallel", "2", "--set", "rounds=2",
            "--set", "clients.train.epochs=1", "--set", "clients.num=4"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4/4 runs completed" in proc.stdout
    configs = sorted(p.parent.parent.name for p in out.glob("*/seed-0/summary.json"))
    assert configs == ["name=feddf,weighting=entropy", "name=feddf,weighting=uniform",
                       "name=fedmd,weighting=entropy", "name=fedmd,weighting=uniform"]
    proc = subprocess.run([sys.executable, "-m", "fedkd.cli", "report", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| name=")]
    assert len(rows) == 4
