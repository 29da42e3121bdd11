"""``fedkd report``: compare runs and sweeps — a table over seeds, plots, teacher weights.

Runs are grouped into configurations (a sweep's grid point, or scenario + strategy +
weighting for loose runs); each configuration's seeds give mean ± std of final and best
accuracy, and the rounds and MB needed to first reach a target accuracy. Runs with local test
splits (``data.local_test_fraction > 0``) add the final personalised accuracy: the mean over
clients of their local test accuracy (``local-acc``) and of the worst 10 % of clients
(``local-acc-worst10``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedkd.record import draw_teacher_weights, integer_ticks


@dataclass(frozen=True)
class Run:
    """One finished run folder, loaded."""

    path: Path
    config: str
    seed: int
    metrics: list[dict[str, Any]]
    teachers: list[dict[str, Any]]
    archs: dict[int, str] = field(default_factory=dict)
    """Architecture per client id (from ``partition.parquet`` or ``clients.parquet``)."""


def _config_label(run_dir: Path, scenario: dict[str, Any]) -> str:
    """The grid point of a sweep run, else ``scenario/strategy[/weighting]``."""
    if (run_dir.parent.parent / "sweep.json").exists():
        return run_dir.parent.name
    strategy = scenario.get("strategy", {})
    label = f"{scenario.get('name', '?')}/{strategy.get('name', '?')}"
    weighting = strategy.get("params", {}).get("weighting")
    return f"{label}/{weighting}" if weighting else label


def run_archs(run_dir: Path) -> dict[int, str]:
    """Architecture per client id of a run folder; empty when no file records it.

    ``partition.parquet`` (one row per client) is read first, else ``clients.parquet``
    (one row per client and round); both carry ``client`` and ``arch`` columns.
    """
    for name in ("partition.parquet", "clients.parquet"):
        path = run_dir / name
        if path.exists() and {"client", "arch"} <= set(pq.read_schema(path).names):
            cols = pq.read_table(path, columns=["client", "arch"]).to_pydict()
            return {int(c): str(a) for c, a in zip(cols["client"], cols["arch"], strict=True)
                    if c is not None and a is not None}
    return {}


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run folder (one with ``summary.json`` and ``metrics.parquet``) under ``paths``."""
    found: dict[Path, Run] = {}
    for root in paths:
        candidates = [root] if (root / "summary.json").exists() else sorted(
            p.parent for p in root.rglob("summary.json"))
        for d in candidates:
            if d in found or not (d / "metrics.parquet").exists():
                continue
            scenario = yaml.safe_load((d / "scenario.yaml").read_text()) or {}
            teachers = (pq.read_table(d / "teachers.parquet").to_pylist()
                        if (d / "teachers.parquet").exists() else [])
            found[d] = Run(path=d, config=_config_label(d, scenario),
                           seed=int(scenario.get("seed", 0)),
                           metrics=pq.read_table(d / "metrics.parquet").to_pylist(),
                           teachers=teachers, archs=run_archs(d))
    return sorted(found.values(), key=lambda r: (r.config, r.seed))


def _acc(row: dict[str, Any], key: str = "acc") -> float | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def final_value(metrics: list[dict[str, Any]], key: str) -> float:
    """The last recorded (non-missing) value of ``key`` (nan if none)."""
    values = [a for a in (_acc(r, key) for r in metrics) if a is not None]
    return values[-1] if values else math.nan


def _mb(row: dict[str, Any]) -> float:
    return (row.get("bytes_down_cum", 0) + row.get("bytes_up_cum", 0)) / 1e6


def _vt(row: dict[str, Any]) -> float:
    v = row.get("virtual_time")
    return math.nan if v is None else float(v)


def equal_point(runs: list[Run], x_of: Any) -> float:
    """The largest x every run reaches: the smallest final cumulative MB (or virtual time)."""
    ends = [x_of(r.metrics[-1]) for r in runs if r.metrics]
    return min(ends) if ends and not any(math.isnan(e) for e in ends) else math.nan


def acc_at(metrics: list[dict[str, Any]], x_of: Any, x: float) -> float:
    """The last test accuracy recorded at or before ``x`` (nan if none)."""
    acc = math.nan
    if math.isnan(x):
        return acc
    for row in metrics:
        if x_of(row) > x + 1e-12:
            break
        a = _acc(row)
        acc = a if a is not None else acc
    return acc


def first_reach(metrics: list[dict[str, Any]], target: float) -> tuple[float, float]:
    """Round and cumulative MB at which accuracy first reaches ``target`` (nan if never)."""
    for row in metrics:
        acc = _acc(row)
        if acc is not None and acc >= target:
            return float(row["round"]), _mb(row)
    return math.nan, math.nan


def _final_best(run: Run) -> tuple[float, float]:
    accs = [a for a in map(_acc, run.metrics) if a is not None]
    return (accs[-1], max(accs)) if accs else (math.nan, math.nan)


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    if not len(ok):
        return math.nan, math.nan
    return float(ok.mean()), float(ok.std(ddof=1)) if len(ok) > 1 else 0.0


def table(runs: list[Run], target: float | None = None,
          baseline: str | None = None) -> tuple[list[dict[str, Any]], float]:
    """One row per configuration, and the target accuracy used.

    The target is ``target`` if given, else the mean final accuracy of ``baseline``, else the
    lowest mean final accuracy over configurations.
    """
    configs = sorted({r.config for r in runs})
    finals = {c: _stats([_final_best(r)[0] for r in runs if r.config == c])[0] for c in configs}
    equal_mb, equal_time = equal_point(runs, _mb), equal_point(runs, _vt)
    if target is None:
        if baseline is not None and baseline not in finals:
            raise ValueError(f"--baseline {baseline!r} is not one of {configs}")
        target = finals[baseline] if baseline else min(finals.values())
    rows = []
    for c in configs:
        group = [r for r in runs if r.config == c]
        fb = [_final_best(r) for r in group]
        reach = [first_reach(r.metrics, target) for r in group]
        final, final_sd = _stats([f for f, _ in fb])
        best, best_sd = _stats([b for _, b in fb])
        rnd, rnd_sd = _stats([x for x, _ in reach])
        mb, mb_sd = _stats([m for _, m in reach])
        rows.append({
            "config": c, "seeds": len(group), "final_acc": final, "final_acc_std": final_sd,
            "best_acc": best, "best_acc_std": best_sd, "rounds_to_target": rnd,
            "rounds_to_target_std": rnd_sd,
            "reached": sum(not math.isnan(x) for x, _ in reach), "mb_to_target": mb,
            "mb_to_target_std": mb_sd,
            "mb_total": _stats([_mb(r.metrics[-1]) for r in group if r.metrics])[0]})
        at_mb = _stats([acc_at(r.metrics, _mb, equal_mb) for r in group])
        at_time = _stats([acc_at(r.metrics, _vt, equal_time) for r in group])
        rows[-1].update({"equal_mb": equal_mb, "acc_at_equal_mb": at_mb[0],
                         "acc_at_equal_mb_std": at_mb[1], "equal_virtual_s": equal_time,
                         "acc_at_equal_time": at_time[0], "acc_at_equal_time_std": at_time[1]})
        for key, col in (("local-acc", "final_local_acc"),
                         ("local-acc-worst10", "final_local_acc_worst10")):
            mean, sd = _stats([final_value(r.metrics, key) for r in group])
            rows[-1].update({col: mean, f"{col}_std": sd})
    return rows, target


def _pm(mean: float, sd: float, digits: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(rows: list[dict[str, Any]], target: float) -> str:
    """The comparison table as Markdown."""
    timed = bool(rows) and not math.isnan(rows[0].get("equal_virtual_s", math.nan))
    local = any(not math.isnan(r.get("final_local_acc", math.nan)) for r in rows)
    equal = (f"Equal budget: {rows[0]['equal_mb']:.1f} MB (the least any run sent)"
             if rows else "")
    if timed:
        equal += f"; equal virtual time: {rows[0]['equal_virtual_s']:.1f} s"
    lines = [f"Target accuracy: {target:.4f}", "", equal, "",
             "| config | seeds | final acc | best acc | rounds to target | MB to target "
             "| MB total | acc at equal MB |" + (" acc at equal virtual time |" if timed else "")
             + (" final local acc | final local acc worst 10 % |" if local else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if timed else "")
             + ("---|---|" if local else "")]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['seeds']} | {_pm(r['final_acc'], r['final_acc_std'], 4)} "
            f"| {_pm(r['best_acc'], r['best_acc_std'], 4)} "
            f"| {_pm(r['rounds_to_target'], r['rounds_to_target_std'], 1)}"
            f" ({r['reached']}/{r['seeds']}) "
            f"| {_pm(r['mb_to_target'], r['mb_to_target_std'], 1)} | {r['mb_total']:.1f} "
            f"| {_pm(r['acc_at_equal_mb'], r['acc_at_equal_mb_std'], 4)} |"
            + (f" {_pm(r['acc_at_equal_time'], r['acc_at_equal_time_std'], 4)} |"
               if timed else "")
            + (f" {_pm(r['final_local_acc'], r['final_local_acc_std'], 4)} "
               f"| {_pm(r['final_local_acc_worst10'], r['final_local_acc_worst10_std'], 4)} |"
               if local else ""))
    return "\n".join(lines) + "\n"


def _curve(runs: list[Run], x_of: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of accuracy across seeds, on the first run's x positions."""
    rows = [[r2 for r2 in r.metrics if _acc(r2) is not None] for r in runs]
    n = min(len(r) for r in rows)
    x = np.array([x_of(row) for row in rows[0][:n]])
    ys = np.array([[_acc(row) for row in r[:n]] for r in rows], dtype=np.float64)
    return x, ys.mean(axis=0), ys.std(axis=0)


def curves_figure(runs: list[Run], x_name: str) -> Figure:
    """Accuracy vs round or vs cumulative MB, one line per config with a ±std seed band.

    Parameters
    ----------
    runs : list[Run]
        Runs to plot, grouped by ``config``.
    x_name : str
        ``"round"`` (integer ticks), ``"mb"`` or ``"virtual_time"``.

    Returns
    -------
    Figure
        One axes.
    """
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x_of = {"round": lambda row: row["round"], "mb": _mb, "virtual_time": _vt}[x_name]
    for c in sorted({r.config for r in runs}):
        x, mean, sd = _curve([r for r in runs if r.config == c], x_of)
        ax.plot(x, mean, label=c)
        ax.fill_between(x, mean - sd, mean + sd, alpha=0.2)
    ax.set_xlabel({"round": "round", "mb": "cumulative MB",
                   "virtual_time": "virtual time (s)"}[x_name])
    if x_name == "round":
        integer_ticks(ax.xaxis)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(runs: list[Run], path: Path, x_name: str) -> None:
    """Write `curves_figure` (accuracy vs ``x_name``: ``"round"`` or ``"mb"``) as PNG."""
    curves_figure(runs, x_name).savefig(path, dpi=110)


def teacher_weights_figure(runs: list[Run]) -> Figure | None:
    """Mean weight per teacher over rounds (across seeds), one panel per config.

    Up to `fedkd.record.TEACHER_LINES_MAX` teachers a panel has one line per teacher,
    labelled ``"client 3 (cnn_small)"``; with more it is a teacher x round heat-map.

    Parameters
    ----------
    runs : list[Run]
        Runs; those without ``teachers.parquet`` rows are skipped.

    Returns
    -------
    Figure | None
        The figure, or ``None`` when no run has teacher weights.
    """
    configs = sorted({r.config for r in runs if r.teachers})
    if not configs:
        return None
    fig = Figure(figsize=(8.5, 3.2 * len(configs)))
    FigureCanvasAgg(fig)
    for i, c in enumerate(configs):
        ax = fig.add_subplot(len(configs), 1, i + 1)
        group = [r for r in runs if r.config == c]
        archs: dict[int, str] = {}
        for r in reversed(group):
            archs.update(r.archs)
        draw_teacher_weights(ax, [t for r in group for t in r.teachers], archs)
        ax.set_title(c, fontsize=8)
    fig.tight_layout()
    return fig


def plot_teacher_weights(runs: list[Run], path: Path) -> bool:
    """Write `teacher_weights_figure` as PNG. False (nothing written) if no teacher weights."""
    fig = teacher_weights_figure(runs)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    return True


def report(paths: list[Path], out: Path | None = None, target: float | None = None,
           baseline: str | None = None) -> tuple[list[dict[str, Any]], Path, str]:
    """Build the comparison: table (Markdown + Parquet) and plots in ``out``.

    Returns
    -------
    tuple
        The table rows, the output folder and the Markdown text.
    """
    runs = find_runs(paths)
    if not runs:
        where = ", ".join(str(p) for p in paths)
        raise FileNotFoundError(f"no run folders (with summary.json) under {where}")
    out = out or paths[0]
    out.mkdir(parents=True, exist_ok=True)
    rows, target = table(runs, target, baseline)
    text = markdown(rows, target)
    (out / "report.md").write_text(text)
    pq.write_table(pa.Table.from_pylist(rows), out / "report.parquet")
    plot_curves(runs, out / "accuracy_vs_round.png", "round")
    plot_curves(runs, out / "accuracy_vs_mb.png", "mb")
    if not math.isnan(equal_point(runs, _vt)):
        plot_curves(runs, out / "accuracy_vs_virtual_time.png", "virtual_time")
    plot_teacher_weights(runs, out / "teacher_weights.png")
    (out / "report.json").write_text(json.dumps({"target": target, "runs": len(runs)}))
    return rows, out, text
