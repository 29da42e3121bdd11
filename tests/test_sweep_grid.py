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


@pytest.mark.slow
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


def test_scenario_sweep_block_and_stable_default_folder(tmp_path: Path) -> None:
    from fedkd.sweep import resolve

    path = tmp_path / "study.yaml"
    path.write_text(f"rounds: 1\noutput: {{dir: {tmp_path / 'runs'}}}\n"
                    "sweep: {grid: {clients.fraction: [0.5, 1.0]}, seeds: [0, 1]}\n")
    first = resolve(str(path))
    assert first.grid == {"clients.fraction": [0.5, 1.0]} and first.seeds == [0, 1]
    assert [(r.config, r.seed) for r in first.runs] == [
        ("fraction=0.5", 0), ("fraction=0.5", 1), ("fraction=1.0", 0), ("fraction=1.0", 1)]
    assert first.root.parent == tmp_path / "runs" / "study"
    assert first.root.name.startswith("sweep-")
    assert resolve(str(path)).root == first.root  # the same command resumes the same folder
    flags = resolve(str(path), ["rounds=1,2"], "3")  # --grid and --seeds win over the block
    assert flags.grid == {"rounds": [1, 2]} and flags.seeds == [3]
    assert flags.root != first.root
