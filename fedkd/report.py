"""``fedkd report``: compare runs and sweeps — a table over seeds, plots, teacher weights.

Runs are grouped into configurations (a sweep's grid point, or scenario + strategy +
weighting for loose runs); each configuration's seeds give mean ± std of final and best
accuracy, and the rounds and MB needed to first reach a target accuracy. Runs with local test
splits (``data.local_test_fraction > 0``) add the final personalised accuracy: the mean over
clients of their local test accuracy (``local-acc``) and of the worst 10 % of clients
(``local-acc-worst10``).

With a baseline configuration, every other configuration is compared with it seed by seed
(`paired_rows`): the differences of the final accuracy on the seeds both ran, their mean and a
two-sided 95 % Student-t interval (`t_quantile`, computed without scipy). Runs that record
teacher-ensemble diagnostics (``teach_*`` columns of ``metrics.parquet``) add their curves
(`teacher_diagnostics_figure`) and a table of their final values (`diagnostic_rows`).
Decentralized runs (peers on a graph, which record ``consensus``) add accuracy and consensus
against rounds and against the bytes sent over the graph's edges (`peers_figure`), and a table
of their final values per configuration (`peer_rows`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from matplotlib.axes import Axes
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


def present_values(metrics: list[dict[str, Any]], key: str) -> list[float]:
    """The recorded values of ``key`` in row order; missing (None) and NaN ones left out."""
    return [a for a in (_acc(r, key) for r in metrics) if a is not None]


def final_value(metrics: list[dict[str, Any]], key: str) -> float:
    """The last recorded (non-missing) value of ``key`` (nan if none)."""
    values = present_values(metrics, key)
    return values[-1] if values else math.nan


def mean_value(metrics: list[dict[str, Any]], key: str) -> float:
    """The mean of the recorded (non-missing) values of ``key`` over rows (nan if none)."""
    values = present_values(metrics, key)
    return float(np.mean(values)) if values else math.nan


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


def check_baseline(configs: list[str], baseline: str | None) -> None:
    """Raise ValueError (one line naming the configurations) if ``baseline`` is not one of them.

    Parameters
    ----------
    configs : list[str]
        The configuration labels found.
    baseline : str | None
        The requested baseline; ``None`` passes.
    """
    if baseline is not None and baseline not in configs:
        raise ValueError(f"--baseline {baseline!r} is not a configuration; available: "
                         f"{', '.join(sorted(configs))}")


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
        check_baseline(configs, baseline)
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


def _curve(runs: list[Run], x_of: Any,
           key: str = "acc") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of ``key`` across seeds, on the first run's x positions."""
    rows = [[r2 for r2 in r.metrics if _acc(r2, key) is not None] for r in runs]
    n = min(len(r) for r in rows)
    x = np.array([x_of(row) for row in rows[0][:n]])
    ys = np.array([[_acc(row, key) for row in r[:n]] for r in rows], dtype=np.float64)
    return x, ys.mean(axis=0), ys.std(axis=0)


def _round_curve(runs: list[Run], key: str,
                 x_key: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of ``key`` across seeds per round, over the seeds that recorded it then.

    Unlike `_curve`, rounds are matched by number, so a value missing in some rounds of one
    seed does not shift the others; rounds where no seed has a value are left out.

    Parameters
    ----------
    runs : list[Run]
        The seeds of one configuration.
    key : str
        The column averaged.
    x_key : str, optional
        A column to use as x instead of the round: its per-round mean over the seeds that
        recorded it (e.g. ``edge_bytes_cum``); rounds without it are left out.

    Returns
    -------
    tuple of np.ndarray
        x (rounds, or the mean of ``x_key``), mean and std of ``key``.
    """
    by_round: dict[int, list[float]] = {}
    x_by_round: dict[int, list[float]] = {}
    for r in runs:
        for row in r.metrics:
            v = _acc(row, key)
            if v is not None:
                by_round.setdefault(int(row["round"]), []).append(v)
            xv = _acc(row, x_key) if x_key is not None else None
            if xv is not None:
                x_by_round.setdefault(int(row["round"]), []).append(xv)
    rounds = sorted(k for k in by_round if x_key is None or k in x_by_round)
    x = (np.array(rounds, dtype=np.int64) if x_key is None else
         np.array([np.mean(x_by_round[k]) for k in rounds], dtype=np.float64))
    mean = np.array([np.mean(by_round[k]) for k in rounds], dtype=np.float64)
    sd = np.array([np.std(by_round[k]) for k in rounds], dtype=np.float64)
    return x, mean, sd


def _band(ax: Axes, x: np.ndarray, mean: np.ndarray, sd: np.ndarray, label: str,
          **style: Any) -> None:
    """A mean line with a shaded ±std band in the line's colour."""
    (line,) = ax.plot(x, mean, label=label, **style)
    ax.fill_between(x, mean - sd, mean + sd, alpha=0.2, color=line.get_color())


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
        _band(ax, *_curve([r for r in runs if r.config == c], x_of), label=c)
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


def _colours(n: int) -> list[Any]:
    """``n`` told-apart colours: the default cycle up to 10, else tab20 (repeating past 20)."""
    return ([f"C{i}" for i in range(n)] if n <= 10 else
            [matplotlib.colormaps["tab20"](i % 20) for i in range(n)])


def _side_legend(fig: Figure, ax: Axes, title: str | None = None) -> None:
    """A figure legend of ``ax``'s lines right of the axes, then a tight layout."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.74, 0.5),
                   fontsize=7, title=title, title_fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0, 0.73, 1))
    else:
        fig.tight_layout()


def save_figure(fig: Figure | None, path: Path) -> bool:
    """Write ``fig`` as PNG; False (nothing written) when there is no figure."""
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    return True


def plot_teacher_weights(runs: list[Run], path: Path) -> bool:
    """Write `teacher_weights_figure` as PNG. False (nothing written) if no teacher weights."""
    return save_figure(teacher_weights_figure(runs), path)


# --- paired comparison against a baseline -------------------------------------------------

_T_TOL = 1e-15
"""Relative tolerance of the continued fraction and of the t-quantile bisection."""


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, NR 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < _T_TOL:
            break
    return h


def beta_inc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function :math:`I_x(a, b)`.

    Parameters
    ----------
    a, b : float
        Positive shape parameters.
    x : float
        Point in ``[0, 1]``.

    Returns
    -------
    float
        :math:`I_x(a, b)`, from the continued fraction on the side where it converges fast.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_cf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student-t distribution function: :math:`P(T \\le t)` with ``df`` degrees of freedom."""
    tail = 0.5 * beta_inc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom.

    Inverts `t_cdf` (the regularised incomplete beta function) by bisection to relative
    precision ~1e-15, so the value is exact to the printed digits for any ``df > 0``, e.g.
    ``t_quantile(0.975, 1) = 12.7062047``, ``t_quantile(0.975, 2) = 4.30265273``.

    Parameters
    ----------
    p : float
        Probability in ``(0, 1)``.
    df : float
        Degrees of freedom, ``> 0``.

    Returns
    -------
    float
        ``t`` with ``t_cdf(t, df) == p``.
    """
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0; got p={p}, df={df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # each halving gains a bit; 200 is far past double precision
        if hi - lo <= _T_TOL * hi:
            break
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std and two-sided Student-t interval of paired differences.

    Parameters
    ----------
    diffs : list[float]
        The differences, one per pair.
    level : float (default: 0.95)
        Coverage of the interval: ``mean ± t_{(1+level)/2, n-1} * sd / sqrt(n)``.

    Returns
    -------
    tuple[float, float, float, float]
        ``(mean, sd, low, high)``; ``sd``, ``low`` and ``high`` are nan for ``n < 2`` (and
        everything for ``n == 0``).
    """
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    arr = np.asarray(diffs, dtype=np.float64)
    mean = float(arr.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    sd = float(arr.std(ddof=1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


@dataclass(frozen=True)
class PairedRow:
    """One configuration's paired differences (config − baseline) of one metric.

    ``includes_zero`` is also true when there is no interval (fewer than two pairs): the
    difference is then not shown to differ from zero.
    """

    config: str
    metric: str
    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    mean: float
    sd: float
    low: float
    high: float

    @property
    def n(self) -> int:
        """Number of paired seeds."""
        return len(self.seeds)

    @property
    def includes_zero(self) -> bool:
        """Whether the 95 % interval includes 0 (true without an interval)."""
        return not (self.low > 0 or self.high < 0)

    @property
    def verdict(self) -> str:
        """``"better"``, ``"worse"``, ``"interval includes 0"`` or why there is no interval."""
        if self.n == 0:
            return "no common seeds"
        if self.n == 1:
            return "n = 1: no interval"
        if self.low > 0:
            return "better"
        return "worse" if self.high < 0 else "interval includes 0"

    def as_dict(self, baseline: str) -> dict[str, Any]:
        """The row of ``paired.parquet``."""
        return {"metric": self.metric, "baseline": baseline, "config": self.config,
                "n": self.n, "seeds": list(self.seeds), "diffs": list(self.diffs),
                "mean_diff": self.mean, "sd_diff": self.sd, "ci_low": self.low,
                "ci_high": self.high, "includes_zero": self.includes_zero,
                "verdict": self.verdict}


PAIRED_SCHEMA = pa.schema([
    ("metric", pa.string()), ("baseline", pa.string()), ("config", pa.string()),
    ("n", pa.int64()), ("seeds", pa.list_(pa.int64())), ("diffs", pa.list_(pa.float64())),
    ("mean_diff", pa.float64()), ("sd_diff", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("includes_zero", pa.bool_()), ("verdict", pa.string())])
"""Columns of ``paired.parquet``: one row per metric and compared configuration."""


def seed_values(runs: list[Run], config: str, key: str = "acc") -> dict[int, float]:
    """Final value of ``key`` per seed of ``config``; seeds without one are left out.

    Several runs of one configuration and seed (repeated loose runs) are averaged.
    """
    per_seed: dict[int, list[float]] = {}
    for r in runs:
        v = final_value(r.metrics, key) if r.config == config else math.nan
        if not math.isnan(v):
            per_seed.setdefault(r.seed, []).append(v)
    return {s: float(np.mean(v)) for s, v in sorted(per_seed.items())}


def paired_rows(runs: list[Run], baseline: str, key: str = "acc") -> list[PairedRow]:
    """Pair every other configuration's seeds with the baseline's and summarise the differences.

    Parameters
    ----------
    runs : list[Run]
        Runs of every configuration.
    baseline : str
        The configuration subtracted.
    key : str (default: "acc")
        Metric compared: its final value (`final_value`) per run.

    Returns
    -------
    list[PairedRow]
        One row per configuration other than ``baseline``, in label order; differences are
        config − baseline on the seeds both have, in seed order, with a 95 % t interval.
    """
    base = seed_values(runs, baseline, key)
    rows = []
    for c in sorted({r.config for r in runs} - {baseline}):
        vals = seed_values(runs, c, key)
        seeds = tuple(s for s in vals if s in base)
        diffs = tuple(vals[s] - base[s] for s in seeds)
        rows.append(PairedRow(c, key, seeds, diffs, *t_interval(list(diffs))))
    return rows


def paired_metrics(runs: list[Run]) -> list[str]:
    """``acc``, and ``local-acc`` when some run recorded it."""
    local = any(not math.isnan(final_value(r.metrics, "local-acc")) for r in runs)
    return ["acc", "local-acc"] if local else ["acc"]


def _signed(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:+.4f}"


_METRIC_NAMES = {"acc": "final test accuracy", "local-acc": "final personalised accuracy"}


def paired_markdown(rows: list[PairedRow], baseline: str, key: str = "acc") -> str:
    """``rows`` (from `paired_rows`) as a Markdown section with one table."""
    lines = [f"Paired by seed against `{baseline}`: {_METRIC_NAMES.get(key, key)} (`{key}`), "
             "config − baseline, mean and 95 % Student-t interval", "",
             "| config | n | mean diff | sd | 95 % CI | per-seed diffs | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "—" if math.isnan(r.low) else f"[{_signed(r.low)}, {_signed(r.high)}]"
        per_seed = ", ".join(f"{s}: {_signed(d)}" for s, d in zip(r.seeds, r.diffs, strict=True))
        sd = "—" if math.isnan(r.sd) else f"{r.sd:.4f}"
        lines.append(f"| {r.config} | {r.n} | {_signed(r.mean)} | {sd} | {ci} "
                     f"| {per_seed or '—'} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def write_paired(runs: list[Run], baseline: str, out: Path) -> str:
    """Write ``paired.md`` and ``paired.parquet`` (every `paired_metrics` metric) in ``out``.

    Returns
    -------
    str
        The Markdown written.
    """
    sections, records = [], []
    for key in paired_metrics(runs):
        rows = paired_rows(runs, baseline, key)
        sections.append(paired_markdown(rows, baseline, key))
        records += [r.as_dict(baseline) for r in rows]
    text = "\n".join(sections)
    (out / "paired.md").write_text(text)
    pq.write_table(pa.Table.from_pylist(records, schema=PAIRED_SCHEMA), out / "paired.parquet")
    return text


# --- teacher-ensemble diagnostics ----------------------------------------------------------

DIAGNOSTIC_COLUMNS = ("teach_ens_acc", "teach_w_auc", "teach_w_align", "teach_eff_k")
"""``metrics.parquet`` columns whose final values `diagnostic_rows` averages over seeds."""

DIAGNOSTIC_PANELS = (("teach_ens_acc", "ensemble accuracy", None),
                     ("teach_w_auc", "weight AUC (0.5 = uninformative)", 0.5),
                     ("teach_w_align", "weight alignment (vs uniform)", 0.0))
"""Panels of `teacher_diagnostics_figure`: column, y label and a reference level."""


def has_diagnostics(run: Run) -> bool:
    """Whether the run recorded teacher-ensemble diagnostics (a ``teach_ens_acc`` column)."""
    return any("teach_ens_acc" in row for row in run.metrics)


def diagnostic_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Per configuration with diagnostics: mean ± std over seeds of each final diagnostic.

    Parameters
    ----------
    runs : list[Run]
        Runs; those without a ``teach_ens_acc`` column are left out.

    Returns
    -------
    list[dict]
        ``config``, ``seeds`` and, per :data:`DIAGNOSTIC_COLUMNS` name, ``final_<name>`` and
        ``final_<name>_std``: the last recorded value of each run (`final_value`), averaged.
    """
    with_diag = [r for r in runs if has_diagnostics(r)]
    rows = []
    for c in sorted({r.config for r in with_diag}):
        group = [r for r in with_diag if r.config == c]
        row: dict[str, Any] = {"config": c, "seeds": len(group)}
        for key in DIAGNOSTIC_COLUMNS:
            mean, sd = _stats([final_value(r.metrics, key) for r in group])
            row.update({f"final_{key}": mean, f"final_{key}_std": sd})
        rows.append(row)
    return rows


def diagnostics_markdown(rows: list[dict[str, Any]]) -> str:
    """`diagnostic_rows` as Markdown."""
    lines = ["Teacher ensemble, final round (mean ± std over seeds)", "",
             "| config | seeds | ensemble acc | weight AUC | weight alignment "
             "| effective teachers |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [_pm(r[f"final_{k}"], r[f"final_{k}_std"], 2 if k == "teach_eff_k" else 4)
                 for k in DIAGNOSTIC_COLUMNS]
        lines.append(f"| {r['config']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def teacher_diagnostics_figure(runs: list[Run]) -> Figure | None:
    """Ensemble accuracy and weight alignment vs round, one line per config (±std of seeds).

    Panels follow :data:`DIAGNOSTIC_PANELS`; the value measured on the server validation
    split (``teach_val_*``), where recorded, is drawn dashed in the same colour.

    Parameters
    ----------
    runs : list[Run]
        Runs; only those with a ``teach_ens_acc`` column are drawn.

    Returns
    -------
    Figure | None
        Three stacked axes, or ``None`` when no run has diagnostics.
    """
    with_diag = [r for r in runs if has_diagnostics(r)]
    if not with_diag:
        return None
    configs = sorted({r.config for r in with_diag})
    fig = Figure(figsize=(9.5, 9))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(len(DIAGNOSTIC_PANELS), 1, i + 1)
            for i in range(len(DIAGNOSTIC_PANELS))]
    colours = _colours(len(configs))
    for ax, (key, ylabel, ref) in zip(axes, DIAGNOSTIC_PANELS, strict=True):
        for c, colour in zip(configs, colours, strict=True):
            group = [r for r in with_diag if r.config == c]
            val_key = key.replace("teach_", "teach_val_", 1)
            for k, label, style in ((key, c, "-"), (val_key, f"_{c} (val)", "--")):
                x, mean, sd = _round_curve(group, k)
                if x.size:
                    _band(ax, x, mean, sd, label, color=colour, linestyle=style)
        if ref is not None:
            ax.axhline(ref, color="0.5", lw=0.8, ls=":")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("round")
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    title = "dashed: validation split" if any(
        any(k.startswith("teach_val_") for k in row) for r in with_diag for row in r.metrics
    ) else None
    _side_legend(fig, axes[0], title)
    return fig


def plot_teacher_diagnostics(runs: list[Run], path: Path) -> bool:
    """Write `teacher_diagnostics_figure` as PNG. False (nothing written) without diagnostics."""
    return save_figure(teacher_diagnostics_figure(runs), path)


def write_diagnostics(runs: list[Run], out: Path) -> str:
    """Write ``diagnostics.md``, ``diagnostics.parquet`` and ``teacher_diagnostics.png``.

    Returns
    -------
    str
        The Markdown written, or ``""`` (nothing written) when no run has diagnostics.
    """
    rows = diagnostic_rows(runs)
    if not rows:
        return ""
    return write_section(out, "diagnostics", rows, diagnostics_markdown(rows),
                         lambda: plot_teacher_diagnostics(runs, out / "teacher_diagnostics.png"))


def write_section(out: Path, name: str, rows: list[dict[str, Any]], text: str,
                  plot: Callable[[], bool]) -> str:
    """Write a report section: ``<name>.md`` (``text``), ``<name>.parquet`` (``rows``) and
    its figure (``plot``); returns ``text``."""
    (out / f"{name}.md").write_text(text)
    pq.write_table(pa.Table.from_pylist(rows), out / f"{name}.parquet")
    plot()
    return text


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's correlation of paired values (nan with fewer than 3 or no spread)."""
    if len(xs) < 3:
        return math.nan
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else math.nan


def gain_explained(paired: list[PairedRow], diagnostics: list[dict[str, Any]],
                   leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """Do the diagnostics explain the gains? Across configurations, Pearson's r between each
    configuration's mean paired gain over the baseline and its final diagnostic values.

    Parameters
    ----------
    paired : list[PairedRow]
        `paired_rows` of final accuracy.
    diagnostics : list[dict]
        `diagnostic_rows`.
    leave_out : tuple of str
        Configurations not to correlate over (upper bounds such as the oracle).

    Returns
    -------
    dict
        ``n`` configurations and ``r_<column>`` per :data:`DIAGNOSTIC_COLUMNS` name.
    """
    diag = {r["config"]: r for r in diagnostics}
    pairs = [(p.mean, diag[p.config]) for p in paired
             if p.config in diag and p.config not in leave_out and not math.isnan(p.mean)]
    out: dict[str, Any] = {"n": len(pairs)}
    for key in DIAGNOSTIC_COLUMNS:
        kept = [(g, d[f"final_{key}"]) for g, d in pairs if not math.isnan(d[f"final_{key}"])]
        out[f"r_{key}"] = pearson([g for g, _ in kept], [v for _, v in kept])
    return out


def upper_bound_configs(configs: list[str]) -> tuple[str, ...]:
    """The configurations whose label names an upper-bound weighting (``oracle``)."""
    from strategies.weighting import WEIGHTINGS

    bounds = [n for n in WEIGHTINGS.names() if getattr(WEIGHTINGS.get(n), "upper_bound", False)]
    return tuple(c for c in configs
                 if any(c.endswith(f"={b}") or c.endswith(f"/{b}") for b in bounds))


def gain_markdown(stats: dict[str, Any], baseline: str, left_out: tuple[str, ...]) -> str:
    """`gain_explained` as a sentence."""
    names = {"teach_ens_acc": "ensemble accuracy", "teach_w_auc": "weight AUC",
             "teach_w_align": "weight alignment", "teach_eff_k": "effective teachers"}
    cells = ", ".join(f"{names[k]} r = " + ("n/a (no spread)" if math.isnan(stats[f"r_{k}"])
                                            else f"{stats[f'r_{k}']:+.2f}")
                      for k in DIAGNOSTIC_COLUMNS)
    skipped = f" ({', '.join(left_out)} left out: an upper bound)" if left_out else ""
    return (f"Across {stats['n']} configurations{skipped}, the mean gain in final accuracy "
            f"over `{baseline}` correlates with the final-round {cells}.\n")


# --- peers on a graph (decentralized strategies) -------------------------------------------

PEER_PANELS = (("acc", "accuracy"), ("consensus", "consensus (disagreement)"))
"""Columns of `peers_figure`: metric and y label."""

EDGE_MB_LABEL = "MB over the graph's edges"


def has_peers(run: Run) -> bool:
    """Whether the run's peers recorded their consensus (some non-missing ``consensus``)."""
    return bool(present_values(run.metrics, "consensus"))


def _edge_mb(run: Run) -> float:
    """Total MB sent over the graph's edges: the last ``edge_bytes_cum`` / 1e6 (nan if none)."""
    return final_value(run.metrics, "edge_bytes_cum") / 1e6


def peer_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Per configuration with consensus data: final accuracy, consensus and the edges' cost.

    Parameters
    ----------
    runs : list[Run]
        Runs; those without a recorded ``consensus`` are left out.

    Returns
    -------
    list[dict]
        ``config``, ``seeds``; over seeds, of each run's last recorded value (`final_value`):
        ``final_acc`` and ``final_acc_std``, ``final_acc_min``, ``final_acc_worst10``,
        ``final_local_acc`` (None when no seed recorded ``local-acc``), ``final_consensus``
        and ``final_consensus_std``; ``spectral_gap``: the mean over seeds of each run's mean
        over rounds; ``edge_mb``: the mean total MB over the graph's edges; and
        ``acc_per_edge_mb``: the mean over seeds of final accuracy / edge MB (seeds with no
        edge MB left out; None when none has).
    """
    with_peers = [r for r in runs if has_peers(r)]
    rows = []
    for c in sorted({r.config for r in with_peers}):
        group = [r for r in with_peers if r.config == c]
        acc, acc_sd = _stats([final_value(r.metrics, "acc") for r in group])
        cons, cons_sd = _stats([final_value(r.metrics, "consensus") for r in group])
        local = _stats([final_value(r.metrics, "local-acc") for r in group])[0]
        ratios = [a / mb for a, mb in ((final_value(r.metrics, "acc"), _edge_mb(r))
                                       for r in group) if mb > 0 and not math.isnan(a)]
        rows.append({
            "config": c, "seeds": len(group), "final_acc": acc, "final_acc_std": acc_sd,
            "final_acc_min": _stats([final_value(r.metrics, "acc-min") for r in group])[0],
            "final_acc_worst10": _stats([final_value(r.metrics, "acc-worst10")
                                         for r in group])[0],
            "final_local_acc": None if math.isnan(local) else local,
            "final_consensus": cons, "final_consensus_std": cons_sd,
            "spectral_gap": _stats([mean_value(r.metrics, "spectral_gap") for r in group])[0],
            "edge_mb": _stats([_edge_mb(r) for r in group])[0],
            "acc_per_edge_mb": float(np.mean(ratios)) if ratios else None})
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None or math.isnan(value) else format(value, fmt)


def peers_markdown(rows: list[dict[str, Any]]) -> str:
    """`peer_rows` as a Markdown section: a heading, a table and what its columns mean."""
    local = any(r["final_local_acc"] is not None for r in rows)
    lines = ["## Peers on graphs", "", "Final round (mean ± std over seeds)", "",
             "| config | seeds | final acc | final min acc | final worst 10 % acc |"
             + (" final local acc |" if local else "")
             + " final consensus | spectral gap | edge MB | acc per edge MB |",
             "|---|---|---|---|---|" + ("---|" if local else "") + "---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['seeds']} | {_pm(r['final_acc'], r['final_acc_std'], 4)} "
            f"| {_num(r['final_acc_min'], '.4f')} | {_num(r['final_acc_worst10'], '.4f')} |"
            + (f" {_num(r['final_local_acc'], '.4f')} |" if local else "")
            + f" {_pm(r['final_consensus'], r['final_consensus_std'], 4)} "
            f"| {_num(r['spectral_gap'], '.3f')} | {_num(r['edge_mb'], '.2f')} "
            f"| {_num(r['acc_per_edge_mb'], '#.4g')} |")
    lines += ["", "Consensus is the mean pairwise disagreement of the peers' test-set "
              "predictions (0 when every peer predicts alike); edge MB is the bytes sent over "
              "the graph's edges in the whole run (each edge carrying its sender's upload), "
              "and acc per edge MB each seed's final accuracy divided by its edge MB."]
    return "\n".join(lines) + "\n"


def short_labels(configs: list[str]) -> dict[str, str]:
    """Legend labels: when every configuration is a sweep grid point over the same keys
    (``key=value,key=value``), its values only (``"dpsgd, ring"``); else the label itself."""
    points = [dict(p.split("=", 1) for p in c.split(",")) if all(
        "=" in p for p in c.split(",")) else None for c in configs]
    if not points or any(p is None for p in points) or len({tuple(p) for p in points}) != 1:
        return {c: c for c in configs}
    return {c: ", ".join(p.values()) for c, p in zip(configs, points, strict=True)}


def peers_figure(runs: list[Run]) -> Figure | None:
    """Accuracy and consensus vs round (top) and vs MB over the graph's edges (bottom).

    One line per configuration with consensus data: the mean over seeds per round with a ±std
    band (`_round_curve`); rounds without a value (not evaluated) are skipped. On the bottom
    row x is the per-round mean over seeds of ``edge_bytes_cum`` in MB, on a log scale
    (topologies and strategies differ by orders of magnitude in bytes).

    Parameters
    ----------
    runs : list[Run]
        Runs; only those with a recorded ``consensus`` are drawn.

    Returns
    -------
    Figure | None
        A 2 x 2 grid of axes, or ``None`` when no run has consensus data.
    """
    with_peers = [r for r in runs if has_peers(r)]
    if not with_peers:
        return None
    configs = sorted({r.config for r in with_peers})
    names = short_labels(configs)
    fig = Figure(figsize=(11, 7))
    FigureCanvasAgg(fig)
    axes = [[fig.add_subplot(2, 2, 2 * i + j + 1) for j in range(2)] for i in range(2)]
    for c, colour in zip(configs, _colours(len(configs)), strict=True):
        group = [r for r in with_peers if r.config == c]
        for j, (key, _) in enumerate(PEER_PANELS):
            label = names[c] if j == 0 else f"_{c}"
            x, mean, sd = _round_curve(group, key)
            if x.size:
                _band(axes[0][j], x, mean, sd, label, color=colour)
            x, mean, sd = _round_curve(group, key, x_key="edge_bytes_cum")
            if x.size:
                _band(axes[1][j], x / 1e6, mean, sd, f"_{c}", color=colour)
    for j, (_, ylabel) in enumerate(PEER_PANELS):
        for i, xlabel in enumerate(("round", EDGE_MB_LABEL)):
            ax = axes[i][j]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        integer_ticks(axes[0][j].xaxis)
        axes[1][j].set_xscale("log")
    _side_legend(fig, axes[0][0])
    return fig


def plot_peers(runs: list[Run], path: Path) -> bool:
    """Write `peers_figure` as PNG. False (nothing written) when no run has consensus data."""
    return save_figure(peers_figure(runs), path)


def write_peers(runs: list[Run], out: Path) -> str:
    """Write ``peers.md``, ``peers.parquet`` (`peer_rows`) and ``peers.png`` in ``out``.

    Returns
    -------
    str
        The Markdown written, or ``""`` (nothing written) when no run has consensus data.
    """
    rows = peer_rows(runs)
    if not rows:
        return ""
    return write_section(out, "peers", rows, peers_markdown(rows),
                         lambda: plot_peers(runs, out / "peers.png"))


def report(paths: list[Path], out: Path | None = None, target: float | None = None,
           baseline: str | None = None) -> tuple[list[dict[str, Any]], Path, str]:
    """Build the comparison: table (Markdown + Parquet) and plots in ``out``.

    Parameters
    ----------
    paths : list[Path]
        Run or sweep folders.
    out : Path, optional
        Report folder (default: the first path).
    target : float, optional
        Target accuracy for rounds/MB to target (default: see `table`).
    baseline : str, optional
        A configuration label: its mean final accuracy is the default target, and every other
        configuration is compared with it seed by seed (``paired.md``, ``paired.parquet``).

    Returns
    -------
    tuple
        The table rows, the output folder and the Markdown text: the table, then the paired
        comparison (with a baseline), the teacher diagnostics (when recorded) and the peers on
        graphs (when some run recorded ``consensus``: ``peers.md``, ``peers.parquet``,
        ``peers.png``).

    Raises
    ------
    FileNotFoundError
        No run folder under ``paths``.
    ValueError
        ``baseline`` is not one of the configurations found.
    """
    runs = find_runs(paths)
    if not runs:
        where = ", ".join(str(p) for p in paths)
        raise FileNotFoundError(f"no run folders (with summary.json) under {where}")
    check_baseline(sorted({r.config for r in runs}), baseline)
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
    if baseline is not None:
        text += "\n" + write_paired(runs, baseline, out)
    diagnostics = write_diagnostics(runs, out)
    if diagnostics:
        text += "\n" + diagnostics
        if baseline is not None:
            left_out = upper_bound_configs(sorted({r.config for r in runs}))
            sentence = gain_markdown(gain_explained(paired_rows(runs, baseline),
                                                    diagnostic_rows(runs), left_out),
                                     baseline, left_out)
            with (out / "diagnostics.md").open("a") as f:
                f.write("\n" + sentence)
            text += "\n" + sentence
    peers = write_peers(runs, out)
    if peers:
        text += "\n" + peers
    (out / "report.json").write_text(json.dumps({"target": target, "runs": len(runs)}))
    return rows, out, text
