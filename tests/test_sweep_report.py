"""``fedkd sweep`` (grid x seeds, resume) and ``fedkd report`` (table, plots)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from matplotlib.axes import Axes

from fedkd.compose import from_dict
from fedkd.errors import ScenarioError
from fedkd.report import (
    curves_figure,
    find_runs,
    first_reach,
    report,
    run_archs,
    table,
    teacher_weights_figure,
)
from fedkd.sweep import parse_grid, parse_seeds, plan

ROOT = Path(__file__).resolve().parents[1]


def test_parse_grid_and_seeds() -> None:
    assert parse_grid(["strategy.params.weighting=uniform,entropy", "rounds=2,3"]) == {
        "strategy.params.weighting": ["uniform", "entropy"], "rounds": [2, 3]}
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(ScenarioError):
        parse_grid(["rounds"])
    with pytest.raises(ScenarioError):
        parse_seeds("a,b")


def test_plan_is_grid_times_seeds(tmp_path: Path) -> None:
    scn = from_dict({})
    runs = plan(scn, {"strategy.params.weighting": ["uniform", "entropy"],
                      "clients.train.lr": [0.1]}, [0, 1], tmp_path)
    assert [(r.config, r.seed) for r in runs] == [
        ("weighting=uniform,lr=0.1", 0), ("weighting=uniform,lr=0.1", 1),
        ("weighting=entropy,lr=0.1", 0), ("weighting=entropy,lr=0.1", 1)]
    assert runs[3].overrides == ("strategy.params.weighting=entropy", "clients.train.lr=0.1")
    assert runs[3].run_dir == tmp_path / "weighting=entropy,lr=0.1" / "seed-1"


def _fake_run(d: Path, name: str, seed: int, accs: list[float], mb_per_round: float,
              teachers: list[dict] | None = None, archs: list[str] | None = None) -> None:
    d.mkdir(parents=True)
    (d / "scenario.yaml").write_text(yaml.safe_dump(
        {"name": name, "seed": seed, "strategy": {"name": "feddf", "params": {}}}))
    rows = [{"round": i + 1, "acc": a, "bytes_down_cum": int(mb_per_round * 1e6 * (i + 1)),
             "bytes_up_cum": 0} for i, a in enumerate(accs)]
    pq.write_table(pa.Table.from_pylist(rows), d / "metrics.parquet")
    if teachers:
        pq.write_table(pa.Table.from_pylist(teachers), d / "teachers.parquet")
    if archs:
        pq.write_table(pa.table({"client": list(range(len(archs))), "arch": archs,
                                 "num_examples": [10] * len(archs)}), d / "partition.parquet")
    (d / "summary.json").write_text(json.dumps({"status": "completed"}))


def test_table_mean_std_and_target(tmp_path: Path) -> None:
    _fake_run(tmp_path / "a0", "a", 0, [0.2, 0.5, 0.6], 1.0)
    _fake_run(tmp_path / "a1", "a", 1, [0.3, 0.4, 0.8], 1.0)
    _fake_run(tmp_path / "b0", "b", 0, [0.1, 0.2, 0.3], 2.0)
    runs = find_runs([tmp_path])
    assert [(r.config, r.seed) for r in runs] == [("a/feddf", 0), ("a/feddf", 1), ("b/feddf", 0)]
    rows, target = table(runs)
    assert target == pytest.approx(0.3)  # lowest mean final accuracy
    a, b = rows
    assert a["seeds"] == 2 and a["final_acc"] == pytest.approx(0.7)
    assert a["final_acc_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.6, 0.8
    assert a["best_acc"] == pytest.approx(0.7)
    assert a["rounds_to_target"] == pytest.approx(1.5)  # round 2 (seed 0), round 1 (seed 1)
    assert a["mb_to_target"] == pytest.approx(1.5)
    assert b["rounds_to_target"] == 3 and b["mb_to_target"] == pytest.approx(6.0)
    # equal budget: the least any run sent is a's 3 MB; b had reached 0.1 (round 1, 2 MB)
    assert a["equal_mb"] == b["equal_mb"] == pytest.approx(3.0)
    assert a["acc_at_equal_mb"] == pytest.approx(0.7) and b["acc_at_equal_mb"] == 0.1
    assert math.isnan(a["acc_at_equal_time"])  # no virtual clock in these runs
    rows, target = table(runs, baseline="a/feddf")
    assert target == pytest.approx(0.7)
    assert rows[0]["reached"] == 1 and math.isnan(rows[1]["rounds_to_target"])
    assert all(math.isnan(v) for v in first_reach(runs[0].metrics, 0.99))


def test_accuracy_at_equal_virtual_time(tmp_path: Path) -> None:
    for name, per_round, accs in (("fast", 10.0, [0.3, 0.5, 0.6]), ("slow", 25.0, [0.4, 0.7])):
        d = tmp_path / name
        _fake_run(d, name, 0, accs, 1.0)
        rows = pq.read_table(d / "metrics.parquet").to_pylist()
        for i, r in enumerate(rows):
            r["virtual_time"] = per_round * (i + 1)
        pq.write_table(pa.Table.from_pylist(rows), d / "metrics.parquet")
    runs = find_runs([tmp_path])
    fast, slow = table(runs)[0]
    assert fast["equal_virtual_s"] == 30.0  # fast ends at 30 s, slow at 50 s
    assert fast["acc_at_equal_time"] == 0.6 and slow["acc_at_equal_time"] == 0.4  # 25 s
    out = tmp_path / "report"
    _, _, text = report([tmp_path], out)
    assert "equal virtual time: 30.0 s" in text and (out / "accuracy_vs_virtual_time.png").exists()


def test_report_writes_table_and_plots(tmp_path: Path) -> None:
    teachers = [{"round": r, "client": c, "weight": w} for r in (1, 2) for c, w in
                ((0, 0.25), (1, 0.75))]
    _fake_run(tmp_path / "a0", "a", 0, [0.2, 0.5], 1.0, teachers)
    _fake_run(tmp_path / "b0", "b", 0, [0.1, 0.4], 1.0)
    rows, out, text = report([tmp_path])
    assert len(rows) == 2 and out == tmp_path
    assert text.count("\n| ") == 3  # header + 2 configs
    assert pq.read_table(tmp_path / "report.parquet").num_rows == 2
    for name in ("report.md", "accuracy_vs_round.png", "accuracy_vs_mb.png",
                 "teacher_weights.png"):
        assert (tmp_path / name).stat().st_size > 0


def _integer_ticks(ax: Axes, which: str) -> bool:
    ax.figure.canvas.draw()
    ticks = ax.get_xticks() if which == "x" else ax.get_yticks()
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    ticks = ticks[(ticks >= lo - 1e-9) & (ticks <= hi + 1e-9)]
    return bool(ticks.size) and np.allclose(ticks, np.round(ticks))


def test_report_plots_integer_rounds_and_labelled_teachers(tmp_path: Path) -> None:
    archs = ["cnn_small", "cnn_big", "mlp"]
    few = [{"round": r, "client": c, "class": -1, "weight": w} for r in (1, 2, 3)
           for c, w in ((0, 0.2), (1, 0.3), (2, 0.5))]
    _fake_run(tmp_path / "a0", "a", 0, [0.2, 0.5, 0.6], 1.0, few, archs)
    _fake_run(tmp_path / "a1", "a", 1, [0.3, 0.4, 0.7], 1.0,
              [{**t, "weight": t["weight"] + 0.1} for t in few], archs)
    many = [{"round": r, "client": c, "weight": 1 / 12} for r in (1, 2) for c in range(12)]
    _fake_run(tmp_path / "b0", "b", 0, [0.1, 0.4], 1.0, many)
    runs = find_runs([tmp_path])
    assert runs[0].archs == {0: "cnn_small", 1: "cnn_big", 2: "mlp"} and runs[2].archs == {}

    curves = curves_figure(runs, "round").axes[0]
    assert curves.get_xlabel() == "round" and _integer_ticks(curves, "x")

    fig = teacher_weights_figure(runs)
    lines_ax, heat_ax = [ax for ax in fig.axes if ax.get_title()]
    assert [t.get_text() for t in lines_ax.get_legend().get_texts()] == [
        "client 0 (cnn_small)", "client 1 (cnn_big)", "client 2 (mlp)"]
    # mean over the two seeds
    assert [line.get_ydata().tolist() for line in lines_ax.get_lines()][0] == pytest.approx(
        [0.25] * 3)
    assert not lines_ax.images and _integer_ticks(lines_ax, "x")
    assert len(heat_ax.images) == 1 and heat_ax.images[0].get_array().shape == (12, 2)
    assert _integer_ticks(heat_ax, "x") and _integer_ticks(heat_ax, "y")
    assert teacher_weights_figure([r for r in runs if not r.teachers]) is None


def test_run_archs_falls_back_to_clients_parquet(tmp_path: Path) -> None:
    assert run_archs(tmp_path) == {}
    pq.write_table(pa.Table.from_pylist([{"round": 1, "client": 4, "arch": "mlp"},
                                         {"round": 2, "client": 4, "arch": "mlp"}]),
                   tmp_path / "clients.parquet")
    assert run_archs(tmp_path) == {4: "mlp"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedkd.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=900)


SWEEP_SETS = ("rounds=1", "clients.num=4", "clients.train.epochs=1")


@pytest.mark.slow
def test_sweep_resume_and_report(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "scenarios/quickstart.yaml", "--grid", "clients.train.lr=0.05,0.1",
            "--seeds", "0,1", "--out", str(out), "--no-progress", "--parallel", "2"]
    for s in SWEEP_SETS:
        args += ["--set", s]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4/4 runs completed" in proc.stdout
    summaries = sorted(out.glob("*/seed-*/summary.json"))
    assert len(summaries) == 4
    stamps = {p: p.stat().st_mtime_ns for p in summaries}
    # an interrupted run: its summary says so; resuming re-runs it and only it
    victim = out / "lr=0.1" / "seed-1" / "summary.json"
    victim.write_text(json.dumps({"status": "interrupted"}))
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(victim.read_text())["status"] == "completed"
    for p, t in stamps.items():
        if p != victim:
            assert p.stat().st_mtime_ns == t, f"{p} was re-run"
    seeds = [yaml.safe_load((p.parent / "scenario.yaml").read_text())["seed"] for p in summaries]
    assert sorted(seeds) == [0, 0, 1, 1]
    proc = _cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    table_rows = [line for line in proc.stdout.splitlines() if line.startswith("| lr=")]
    assert len(table_rows) == 2 and all("| 2 |" in line for line in table_rows)
