"""``fedkd report``: paired comparison with a baseline, and teacher-ensemble diagnostics.

The expected numbers are worked by hand. For the paired differences 0.05, 0.02, 0.10 the
mean is 17/300, the sample variance 49/30000, so sd/sqrt(3) = 7/300 exactly and the interval
is 17/300 ± t(0.975, 2) * 7/300 with t(0.975, 2) = 4.30265273 (= 0.95 / sqrt(2 * 0.975 * 0.025),
the closed form for two degrees of freedom); for 0.10, 0.11, 0.10 it is
31/300 ± t(0.975, 2) / 300; for -0.05, -0.02 it is -0.035 ± t(0.975, 1) * 0.015 with
t(0.975, 1) = tan(0.475 pi) = 12.7062047.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fedkd.cli import main
from fedkd.record import teacher_grid
from fedkd.report import (
    Run,
    diagnostic_rows,
    find_runs,
    paired_rows,
    report,
    t_cdf,
    t_interval,
    t_quantile,
    teacher_diagnostics_figure,
)

T1, T2, T4 = 12.7062047, 4.30265273, 2.77644511
"""t(0.975, df) for df = 1, 2, 4 from printed tables."""


def _fake_sweep_run(sweep: Path, config: str, seed: int, accs: list[float],
                    extra: dict[str, list[Any]] | None = None,
                    teachers: list[dict[str, Any]] | None = None) -> Path:
    """A finished sweep run ``sweep/<config>/seed-<seed>`` with one metrics row per accuracy."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "sweep.json").write_text(json.dumps({"grid": {}, "seeds": []}))
    d = sweep / config / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "scenario.yaml").write_text(yaml.safe_dump(
        {"name": "toy", "seed": seed, "strategy": {"name": "feddf", "params": {}}}))
    rows = [{"round": i + 1, "acc": a, "bytes_down_cum": 1_000_000 * (i + 1), "bytes_up_cum": 0}
            for i, a in enumerate(accs)]
    for key, values in (extra or {}).items():
        for row, v in zip(rows, values, strict=True):
            row[key] = v
    pq.write_table(pa.Table.from_pylist(rows), d / "metrics.parquet")
    if teachers:
        pq.write_table(pa.Table.from_pylist(teachers), d / "teachers.parquet")
    (d / "summary.json").write_text(json.dumps({"status": "completed"}))
    return d


def _run(config: str, seed: int, final: float, **extra: float) -> Run:
    """An in-memory run with one round."""
    return Run(path=Path(f"{config}-{seed}"), config=config, seed=seed,
               metrics=[{"round": 1, "acc": 0.0}, {"round": 2, "acc": final, **extra}],
               teachers=[])


def test_t_quantile_matches_tables() -> None:
    assert t_quantile(0.975, 1) == pytest.approx(T1, abs=1e-7)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-13)
    assert t_quantile(0.975, 2) == pytest.approx(T2, abs=1e-8)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-13)
    assert t_quantile(0.975, 4) == pytest.approx(T4, abs=1e-8)
    assert t_quantile(0.975, 10) == pytest.approx(2.22813885, abs=1e-8)
    assert t_quantile(0.975, 30) == pytest.approx(2.04227246, abs=1e-8)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.95996398, abs=1e-6)  # the normal's
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4) and t_quantile(0.5, 3) == 0.0
    assert t_cdf(t_quantile(0.9, 7), 7) == pytest.approx(0.9, abs=1e-14)
    for p, df in ((0.0, 3), (1.0, 3), (0.9, 0)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_t_interval_by_hand() -> None:
    mean, sd, lo, hi = t_interval([0.05, 0.02, 0.10])
    assert mean == pytest.approx(17 / 300) and sd == pytest.approx(math.sqrt(49 / 30000))
    assert lo == pytest.approx(17 / 300 - T2 * 7 / 300, abs=1e-9)
    assert hi == pytest.approx(17 / 300 + T2 * 7 / 300, abs=1e-9)
    assert (lo, hi) == pytest.approx((-0.04372856, 0.15706190), abs=1e-8)
    mean, sd, lo, hi = t_interval([0.3])
    assert mean == 0.3 and all(math.isnan(v) for v in (sd, lo, hi))
    assert all(math.isnan(v) for v in t_interval([]))


def test_paired_rows_pair_by_seed() -> None:
    runs = [_run("base", s, a) for s, a in ((0, 0.50), (1, 0.60), (2, 0.70))]
    runs += [_run("b", s, a) for s, a in ((2, 0.80), (0, 0.55), (1, 0.62))]
    runs += [_run("c", s, a) for s, a in ((0, 0.60), (1, 0.71), (2, 0.80))]
    runs += [_run("d", s, a) for s, a in ((0, 0.40), (1, 0.49), (2, 0.60))]
    runs += [_run("e", s, a) for s, a in ((0, 0.45), (1, 0.58), (7, 0.99))]  # seed 7 unpaired
    runs += [_run("f", 1, 0.65), _run("g", 9, 0.9)]
    b, c, d, e, f, g = paired_rows(runs, "base")
    assert b.config == "b" and b.seeds == (0, 1, 2) and b.n == 3
    assert b.diffs == pytest.approx((0.05, 0.02, 0.10))
    assert (b.mean, b.low, b.high) == pytest.approx(
        (17 / 300, 17 / 300 - T2 * 7 / 300, 17 / 300 + T2 * 7 / 300), abs=1e-9)
    assert b.includes_zero and b.verdict == "interval includes 0"
    assert (c.mean, c.low, c.high) == pytest.approx(
        (31 / 300, (31 - T2) / 300, (31 + T2) / 300), abs=1e-9)
    assert not c.includes_zero and c.verdict == "better"
    assert (d.mean, d.low, d.high) == pytest.approx(
        (-31 / 300, (-31 - T2) / 300, (-31 + T2) / 300), abs=1e-9)
    assert d.verdict == "worse"
    assert e.seeds == (0, 1) and e.diffs == pytest.approx((-0.05, -0.02))
    assert e.sd == pytest.approx(0.03 / math.sqrt(2))
    assert (e.low, e.high) == pytest.approx((-0.035 - T1 * 0.015, -0.035 + T1 * 0.015),
                                            abs=1e-9)
    assert e.verdict == "interval includes 0"
    assert f.n == 1 and f.mean == pytest.approx(0.05) and math.isnan(f.low)
    assert f.includes_zero and f.verdict == "n = 1: no interval"
    assert g.n == 0 and math.isnan(g.mean) and g.verdict == "no common seeds"


def test_paired_rows_average_repeated_seeds_and_skip_missing() -> None:
    no_acc = Run(path=Path("b2"), config="base", seed=2, teachers=[],
                 metrics=[{"round": 1, "acc": None}, {"round": 2, "acc": math.nan}])
    runs = [_run("base", 0, 0.5), _run("base", 1, 0.6), no_acc,
            _run("x", 0, 0.6), _run("x", 0, 0.8), _run("x", 1, 0.6), _run("x", 2, 0.9)]
    (x,) = paired_rows(runs, "base")
    assert x.seeds == (0, 1) and x.diffs == pytest.approx((0.2, 0.0))


def _two_sweeps(root: Path) -> tuple[Path, Path]:
    """Baseline ``w=uniform`` in one sweep; ``w=entropy`` (3 seeds), ``w=conf`` (seeds 0, 1)
    and ``w=better`` in another."""
    one, two = root / "sweep-a", root / "sweep-b"
    for seed, acc in enumerate((0.50, 0.60, 0.70)):
        _fake_sweep_run(one, "w=uniform", seed, [0.1, acc])
    for seed, acc in enumerate((0.55, 0.62, 0.80)):
        _fake_sweep_run(two, "w=entropy", seed, [0.2, acc])
    for seed, acc in enumerate((0.45, 0.58)):
        _fake_sweep_run(two, "w=conf", seed, [0.2, acc])
    for seed, acc in enumerate((0.60, 0.71, 0.80)):
        _fake_sweep_run(two, "w=better", seed, [0.3, acc])
    return one, two


def test_report_writes_paired_comparison(tmp_path: Path) -> None:
    one, two = _two_sweeps(tmp_path)
    out = tmp_path / "report"
    _, _, text = report([one, two], out, baseline="w=uniform")
    md = (out / "paired.md").read_text()
    assert md in text and "against `w=uniform`" in md
    lines = {line.split(" | ")[0][2:]: line for line in md.splitlines()
             if line.startswith("| w=")}
    assert lines["w=entropy"] == ("| w=entropy | 3 | +0.0567 | 0.0404 | [-0.0437, +0.1571] "
                                  "| 0: +0.0500, 1: +0.0200, 2: +0.1000 | interval includes 0 |")
    assert lines["w=conf"].startswith("| w=conf | 2 | -0.0350 | 0.0212 | [-0.2256, +0.1556] ")
    assert lines["w=better"].endswith("| better |")
    table = pq.read_table(out / "paired.parquet").to_pylist()
    assert [(r["metric"], r["baseline"], r["config"]) for r in table] == [
        ("acc", "w=uniform", c) for c in ("w=better", "w=conf", "w=entropy")]
    entropy = table[2]
    assert entropy["n"] == 3 and entropy["seeds"] == [0, 1, 2]
    assert entropy["diffs"] == pytest.approx([0.05, 0.02, 0.10])
    assert entropy["mean_diff"] == pytest.approx(0.0566666667)
    assert entropy["sd_diff"] == pytest.approx(0.0404145188)
    assert (entropy["ci_low"], entropy["ci_high"]) == pytest.approx(
        (-0.0437285637, 0.1570618970), abs=1e-9)
    assert entropy["includes_zero"] and not table[0]["includes_zero"]
    assert table[1]["n"] == 2
    assert (table[1]["ci_low"], table[1]["ci_high"]) == pytest.approx(
        (-0.035 - T1 * 0.015, -0.035 + T1 * 0.015), abs=1e-7)


def test_report_without_baseline_writes_no_paired_files(tmp_path: Path) -> None:
    one, two = _two_sweeps(tmp_path)
    _, out, text = report([one, two], tmp_path / "r")
    assert not (out / "paired.md").exists() and "Paired" not in text


def test_paired_personalised_accuracy_when_recorded(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    for config, locs in (("base", (0.7, 0.8)), ("x", (0.75, 0.9))):
        for seed, loc in enumerate(locs):
            _fake_sweep_run(sweep, config, seed, [0.5, 0.6], {"local-acc": [None, loc]})
    _, out, text = report([sweep], baseline="base")
    rows = pq.read_table(out / "paired.parquet").to_pylist()
    assert [r["metric"] for r in rows] == ["acc", "local-acc"]
    assert rows[1]["diffs"] == pytest.approx([0.05, 0.1])
    assert "final personalised accuracy (`local-acc`)" in text


def test_cli_unknown_baseline_is_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    one, two = _two_sweeps(tmp_path)
    code = main(["report", str(one), str(two), "--out", str(tmp_path / "r"),
                 "--baseline", "w=nope", "--target", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == ("fedkd: error: --baseline 'w=nope' is not a configuration; available: "
                   "w=better, w=conf, w=entropy, w=uniform\n")
    assert main(["report", str(one), str(two), "--out", str(tmp_path / "r"),
                 "--baseline", "w=uniform"]) == 0
    printed = capsys.readouterr().out
    assert "| w=entropy | 3 | +0.0567 |" in printed and "paired.md" in printed


DIAG = {"teach_ens_acc": [0.40, 0.60], "teach_w_auc": [0.50, 0.70],
        "teach_w_align": [0.00, 0.10], "teach_eff_k": [4.0, 3.0]}


def _diag(scale: float, last_missing: str | None = None) -> dict[str, list[Any]]:
    """DIAG with the final values shifted by ``scale``; ``last_missing`` column None at the end."""
    cols: dict[str, list[Any]] = {k: [v[0], v[1] + scale] for k, v in DIAG.items()}
    cols.update({k.replace("teach_", "teach_val_", 1): [v[0], v[1]] for k, v in DIAG.items()})
    if last_missing:
        cols[last_missing][1] = None
    return cols


def test_teacher_diagnostics_table_and_plot(tmp_path: Path) -> None:
    sweep = tmp_path / "s"
    teachers = ([{"round": r, "client": c, "class": -1, "weight": w, "acc": 0.5,
                  "source": "proxy"} for r in (1, 2) for c, w in ((0, 0.25), (1, 0.75))]
                + [{"round": r, "client": -1, "class": -1, "weight": None, "acc": 0.6,
                    "source": "proxy"} for r in (1, 2)]
                + [{"round": r, "client": c, "class": -1, "weight": 0.9, "acc": 0.5,
                    "source": "val"} for r in (1, 2) for c in (0, 1)])
    _fake_sweep_run(sweep, "w=a", 0, [0.3, 0.5], _diag(0.0), teachers)
    _fake_sweep_run(sweep, "w=a", 1, [0.3, 0.5], _diag(0.1, last_missing="teach_w_auc"))
    _fake_sweep_run(sweep, "w=b", 0, [0.3, 0.4], _diag(-0.1))
    _fake_sweep_run(sweep, "w=none", 0, [0.2, 0.3])  # no teacher ensemble
    runs = find_runs([sweep])
    a, b = diagnostic_rows(runs)
    assert a["config"] == "w=a" and a["seeds"] == 2 and b["seeds"] == 1
    assert a["final_teach_ens_acc"] == pytest.approx(0.65)
    assert a["final_teach_ens_acc_std"] == pytest.approx(math.sqrt(0.005))
    # seed 1 has no final-round AUC: its last recorded one (round 1, 0.5) counts
    assert a["final_teach_w_auc"] == pytest.approx(0.6)
    assert a["final_teach_w_align"] == pytest.approx(0.15)
    assert a["final_teach_eff_k"] == pytest.approx(3.05)
    assert b["final_teach_ens_acc"] == pytest.approx(0.5)
    assert b["final_teach_eff_k"] == pytest.approx(2.9)

    _, out, text = report([sweep], tmp_path / "r")
    md = (out / "diagnostics.md").read_text()
    assert md in text
    assert ("| w=a | 2 | 0.6500 ± 0.0707 | 0.6000 ± 0.1414 | 0.1500 ± 0.0707 "
            "| 3.05 ± 0.07 |") in md
    assert "| w=b | 1 | 0.5000 ± 0.0000 | 0.6000 ± 0.0000 | 0.0000 ± 0.0000 " in md
    assert "w=none" not in md
    assert pq.read_table(out / "diagnostics.parquet").num_rows == 2
    for name in ("teacher_diagnostics.png", "teacher_weights.png"):
        assert (out / name).stat().st_size > 0

    fig = teacher_diagnostics_figure(runs)
    acc_ax, auc_ax, align_ax = fig.axes
    means = {line.get_label(): line.get_ydata().tolist() for line in acc_ax.get_lines()}
    assert means["w=a"] == pytest.approx([0.40, 0.65]) and means["w=b"] == pytest.approx(
        [0.40, 0.50])
    assert means["_w=a (val)"] == pytest.approx([0.40, 0.60])
    auc = {line.get_label(): line for line in auc_ax.get_lines()}
    assert auc["w=a"].get_xdata().tolist() == [1, 2]
    assert auc["w=a"].get_ydata().tolist() == pytest.approx([0.5, 0.7])  # round 2: seed 0 only


def test_no_diagnostics_no_files(tmp_path: Path) -> None:
    _fake_sweep_run(tmp_path, "w=a", 0, [0.3, 0.5])
    _, out, text = report([tmp_path])
    assert not (out / "teacher_diagnostics.png").exists()
    assert not (out / "diagnostics.md").exists() and "Teacher ensemble" not in text
    assert teacher_diagnostics_figure(find_runs([tmp_path])) is None


def test_teacher_grid_ignores_ensemble_and_validation_rows() -> None:
    rows = [{"round": 1, "client": 0, "class": -1, "weight": 0.2, "source": "proxy"},
            {"round": 1, "client": 1, "class": -1, "weight": 0.8, "source": "proxy"},
            {"round": 1, "client": -1, "class": -1, "weight": 1.0, "source": "proxy"},
            {"round": 1, "client": -1, "class": -1, "weight": math.nan, "source": "proxy"},
            {"round": 1, "client": 0, "class": -1, "weight": 0.9, "source": "val"},
            {"round": 1, "client": 0, "class": 3, "weight": 0.5, "source": "proxy"}]
    clients, rounds, mean = teacher_grid(rows)
    assert clients.tolist() == [0, 1] and rounds.tolist() == [1]
    assert mean[:, 0] == pytest.approx([0.2, 0.8])


def test_gain_explained_correlates_gains_with_diagnostics() -> None:
    from fedkd.report import PairedRow, gain_explained, gain_markdown, pearson, upper_bound_configs

    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    assert math.isnan(pearson([1.0, 2.0], [1.0, 2.0]))

    def row(config: str, diffs: list[float]) -> PairedRow:
        return PairedRow(config=config, metric="acc", seeds=tuple(range(len(diffs))),
                         diffs=tuple(diffs), mean=sum(diffs) / len(diffs), sd=0.0, low=0.0,
                         high=0.0)

    paired = [row("w=a", [0.1]), row("w=b", [0.2]), row("w=c", [0.3]), row("w=oracle", [0.9])]
    diag = [{"config": c, **{f"final_{k}": v for k, v in zip(
        ("teach_ens_acc", "teach_w_auc", "teach_w_align", "teach_eff_k"), vals, strict=True)}}
        for c, vals in (("w=a", (0.5, 0.5, 0.0, 8.0)), ("w=b", (0.6, 0.7, 0.1, 6.0)),
                        ("w=c", (0.7, 0.6, 0.2, 7.0)), ("w=oracle", (1.0, 1.0, 0.3, 5.0)))]
    left_out = upper_bound_configs(["w=a", "w=oracle"])
    assert left_out == ("w=oracle",)
    stats = gain_explained(paired, diag, left_out)
    assert stats["n"] == 3
    assert stats["r_teach_ens_acc"] == pytest.approx(1.0)
    assert stats["r_teach_w_auc"] == pytest.approx(0.5)
    assert stats["r_teach_eff_k"] == pytest.approx(-0.5)
    text = gain_markdown(stats, "w=u", left_out)
    assert "Across 3 configurations (w=oracle left out" in text and "weight AUC r = +0.50" in text
