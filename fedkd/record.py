"""Run records: Parquet logs, plots and a Prometheus exporter."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class ParquetLog:
    """Rows kept in memory and rewritten atomically to a Parquet file after every change.

    Parameters
    ----------
    path : Path
        Destination ``.parquet`` file; parent directories are created.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._rows: list[dict[str, Any]] = []

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All rows appended so far (copies)."""
        return [dict(r) for r in self._rows]

    def append(self, row: dict[str, Any]) -> None:
        """Add one row and rewrite the file."""
        self.extend([row])

    def extend(self, rows: list[dict[str, Any]]) -> None:
        """Add several rows and rewrite the file."""
        self._rows.extend(dict(r) for r in rows)
        self._write()

    def _columns(self) -> list[str]:
        """Union of the keys of all rows, in first-seen order."""
        return list(dict.fromkeys(k for r in self._rows for k in r))

    def _write(self) -> None:
        """Write all rows to a temporary file, then atomically replace the target."""
        cols = self._columns()
        table = pa.Table.from_pylist(self._rows, schema=_infer_schema(self._rows, cols))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)


def _infer_schema(rows: list[dict[str, Any]], cols: list[str]) -> pa.Schema:
    """Arrow schema from the non-null values of every column (int + float becomes float)."""
    fields = []
    for col in cols:
        values = [r[col] for r in rows if r.get(col) is not None]
        fields.append(pa.field(col, _column_type(values)))
    return pa.schema(fields)


def _column_type(values: list[Any]) -> pa.DataType:
    """Arrow type able to hold every value of a column."""
    if not values:
        return pa.null()
    numeric = all(
        isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values
    )
    if numeric and any(isinstance(v, float | np.floating) for v in values):
        return pa.float64()
    return pa.array(values).type


def _is_missing(value: Any) -> bool:
    """True for None and NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


#: Personalised accuracy columns drawn beside the test accuracy (``local-acc-std`` is a spread,
#: not an accuracy, and is left out of the plot); ``-private`` ones are a strategy's private
#: models where it also has a global model (FML).
LOCAL_ACC_COLUMNS = ("local-acc", "local-acc-worst10", "local-acc-private",
                     "local-acc-private-worst10")


def _acc_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns whose name starts with ``acc`` and the personalised accuracy columns
    (:data:`LOCAL_ACC_COLUMNS`), in first-seen order."""
    return [c for c in dict.fromkeys(k for r in rows for k in r)
            if c.startswith("acc") or c in LOCAL_ACC_COLUMNS]


def _cum_mb(row: dict[str, Any]) -> float:
    """Cumulative traffic of a row in MB."""
    return (row.get("bytes_down_cum", 0) + row.get("bytes_up_cum", 0)) / 1e6


PARTITION_HEATMAP_MAX_CLIENTS = 50
"""Populations up to this size get the client x class heat-map; larger ones the share plot."""

TEACHER_LINES_MAX = 10
"""Up to this many teachers are drawn as labelled lines; more as a teacher x round heat-map."""


def integer_ticks(*axes: Axis) -> None:
    """Put major ticks on whole numbers only (rounds, client ids, classes).

    Parameters
    ----------
    *axes : matplotlib.axis.Axis
        Axes' ``xaxis`` / ``yaxis`` to fix; ``min_n_ticks=1`` keeps a single round integer too.
    """
    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def accuracy_figure(metrics_rows: list[dict[str, Any]]) -> Figure:
    """Accuracy against round (integer ticks) and against cumulative traffic.

    Parameters
    ----------
    metrics_rows : list[dict]
        Per-round rows with ``round``, ``bytes_down_cum``, ``bytes_up_cum`` and ``acc*`` columns.

    Returns
    -------
    Figure
        Panels by round, by cumulative MB and, for runs with a virtual clock, by virtual time.
    """
    timed = any(not _is_missing(r.get("virtual_time")) for r in metrics_rows)
    fig = Figure(figsize=(16 if timed else 11, 4))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, 3 if timed else 2))
    ax_r, ax_b = axes[:2]
    for col in _acc_columns(metrics_rows):
        rows = [r for r in metrics_rows if not _is_missing(r.get(col))]
        acc = [float(r[col]) for r in rows]
        ax_r.plot([r["round"] for r in rows], acc, marker=".", label=col)
        ax_b.plot([_cum_mb(r) for r in rows], acc, marker=".", label=col)
        if timed:
            axes[2].plot([r["virtual_time"] for r in rows], acc, marker=".", label=col)
    ax_r.set_xlabel("round")
    integer_ticks(ax_r.xaxis)
    ax_b.set_xlabel("cumulative traffic (MB)")
    if timed:
        axes[2].set_xlabel("virtual time (s)")
    for ax in axes:
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return fig


def plot_accuracy(metrics_rows: list[dict[str, Any]], path: Path) -> None:
    """Plot accuracy against round and against cumulative traffic (see `accuracy_figure`).

    Parameters
    ----------
    metrics_rows : list[dict]
        Per-round rows with ``round``, ``bytes_down_cum``, ``bytes_up_cum`` and ``acc*`` columns.
    path : Path
        Output PNG.
    """
    _save(accuracy_figure(metrics_rows), path)


def partition_figure(counts: np.ndarray, title: str) -> Figure:
    """Figure of examples per client and class, readable from a handful to 10,000+ clients.

    Up to `PARTITION_HEATMAP_MAX_CLIENTS` clients: a client x class heat-map (counts written in
    the cells when there are at most 400). Beyond: clients sorted by dominant class (then by
    its share) with their class shares stacked, their sizes in a panel below, the per-class
    totals beside and the population totals in a note. Everything is drawn from whole arrays
    (no artist per client), so 10,000 clients take about as long as 100.

    Parameters
    ----------
    counts : np.ndarray
        Integer matrix of shape ``(num_clients, num_classes)``.
    title : str
        Figure title.

    Returns
    -------
    Figure
        The figure, with integer ticks on every client, client-rank and class axis.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts must be (num_clients, num_classes), got shape {counts.shape}")
    if counts.shape[0] <= PARTITION_HEATMAP_MAX_CLIENTS:
        return _partition_heatmap(counts, title)
    return _partition_shares(counts, title)


def plot_partition(counts: np.ndarray, path: Path, title: str) -> None:
    """Write the partition figure (see `partition_figure`) as PNG.

    Parameters
    ----------
    counts : np.ndarray
        Integer matrix of shape ``(num_clients, num_classes)``.
    path : Path
        Output PNG.
    title : str
        Figure title.
    """
    _save(partition_figure(counts, title), path)


def _partition_heatmap(counts: np.ndarray, title: str) -> Figure:
    """Client x class heat-map of a small population."""
    n_clients, n_classes = counts.shape
    fig = Figure(figsize=(max(4, 0.5 * n_classes + 2), max(3, 0.3 * n_clients + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="examples")
    if counts.size <= 400:
        _annotate(ax, counts)
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    integer_ticks(ax.xaxis, ax.yaxis)
    ax.set_title(title)
    return fig


def _partition_shares(counts: np.ndarray, title: str) -> Figure:
    """Sorted stacked class shares, client sizes, class totals and population totals.

    Clients are ordered by dominant class, then by its share (then size), descending; each
    client's column stacks its class shares largest first, as an image (one column per client).
    """
    n_clients, n_classes = counts.shape
    sizes = counts.sum(axis=1)
    shares = np.divide(counts, sizes[:, None], out=np.zeros(counts.shape, dtype=np.float64),
                       where=sizes[:, None] > 0)
    dominant = shares.argmax(axis=1)
    order = np.lexsort((-sizes, -shares.max(axis=1), dominant))
    colors = _class_colors(n_classes)
    x = np.arange(n_clients)

    fig = Figure(figsize=(12, 7))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(3, 1.4))
    ax_s = fig.add_subplot(grid[0, 0])
    ax_n = fig.add_subplot(grid[1, 0], sharex=ax_s)
    ax_c = fig.add_subplot(grid[0, 1])
    ax_t = fig.add_subplot(grid[1, 1])

    ax_s.imshow(_share_image(shares[order], colors), aspect="auto", origin="lower",
                extent=(-0.5, n_clients - 0.5, 0, 1),
                interpolation="nearest" if n_clients <= 1000 else "antialiased")
    bounds = np.flatnonzero(np.diff(dominant[order])) + 0.5
    ax_s.vlines(bounds, 0, 1, colors="white", linewidth=0.6)
    _label_groups(ax_s, dominant[order], n_clients)
    ax_s.set_xlim(-0.5, n_clients - 0.5)
    ax_s.set_ylim(0, 1)
    ax_s.set_ylabel("class share (largest at the bottom)")
    ax_s.tick_params(labelbottom=False)

    ax_n.fill_between(x, sizes[order], step="mid", color="0.35", linewidth=0)
    ax_n.set_ylim(bottom=0)
    ax_n.set_ylabel("examples")
    ax_n.set_xlabel("client rank (sorted by dominant class, then its share)")
    ax_n.grid(alpha=0.3)
    integer_ticks(ax_s.xaxis, ax_n.xaxis)

    ax_c.barh(np.arange(n_classes), counts.sum(axis=0), color=colors)
    ax_c.invert_yaxis()
    ax_c.set_ylabel("class")
    ax_c.set_xlabel("examples")
    ax_c.set_title("class totals", fontsize=9)
    if n_classes <= 20:
        ax_c.set_yticks(np.arange(n_classes))
    else:
        integer_ticks(ax_c.yaxis)

    ax_t.axis("off")
    ax_t.text(0, 1, _partition_note(sizes), va="top", ha="left", fontsize=9,
              family="monospace", transform=ax_t.transAxes)
    fig.suptitle(title)
    return fig


def _share_image(shares: np.ndarray, colors: list[tuple[float, float, float, float]],
                 height: int = 256) -> np.ndarray:
    """RGBA image of stacked class shares, one column per client, its largest share lowest.

    Parameters
    ----------
    shares : np.ndarray
        ``(num_clients, num_classes)`` class fractions; rows of empty clients are all zero
        (drawn white).
    colors : list
        One RGBA colour per class.
    height : int
        Pixel rows spanning shares 0 to 1.

    Returns
    -------
    np.ndarray
        ``(height, num_clients, 4)`` uint8 image (row 0 is share 0).
    """
    n_clients, n_classes = shares.shape
    by_share = np.argsort(-shares, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(shares, by_share, axis=1), axis=1)
    levels = (np.arange(height) + 0.5) / height
    rank = np.zeros((height, n_clients), dtype=np.intp)
    for j in range(n_classes):  # over classes, not clients: (height, clients) per step
        rank += cum[None, :, j] < levels[:, None]
    empty = cum[:, -1] <= 0
    rank = np.minimum(rank, n_classes - 1)
    palette = np.vstack([np.asarray(colors) * 255, [255, 255, 255, 255]]).astype(np.uint8)
    cls = np.where(empty[None, :], n_classes, by_share[np.arange(n_clients)[None, :], rank])
    return palette[cls]


def _partition_note(sizes: np.ndarray) -> str:
    """Population totals: clients, examples, client-size quantiles, empty clients."""
    q = np.percentile(sizes, [0, 50, 100]) if sizes.size else np.zeros(3)
    return (f"{sizes.size:,} clients\n{int(sizes.sum()):,} examples\n"
            f"size min    {int(q[0]):,}\nsize median {q[1]:,.0f}\nsize max    {int(q[2]):,}\n"
            f"empty       {int((sizes == 0).sum()):,}")


def _label_groups(ax: Axes, dominant: np.ndarray, n_clients: int) -> None:
    """Name the dominant class of each group of sorted clients on the top axis (wide ones)."""
    classes, starts, widths = np.unique(dominant, return_index=True, return_counts=True)
    wide = widths >= max(1.0, n_clients / 40)
    top = ax.secondary_xaxis("top")
    top.set_ticks((starts + (widths - 1) / 2)[wide], labels=[str(c) for c in classes[wide]])
    top.tick_params(labelsize=7, length=2)
    top.set_xlabel("dominant class", fontsize=8)


def _class_colors(n_classes: int) -> list[tuple[float, float, float, float]]:
    """One colour per class: qualitative up to 20 classes, a sampled colormap beyond."""
    if n_classes <= 10:
        return [colormaps["tab10"](i) for i in range(n_classes)]
    if n_classes <= 20:
        return [colormaps["tab20"](i) for i in range(n_classes)]
    return [colormaps["turbo"](v) for v in np.linspace(0, 1, n_classes)]


def _annotate(ax: Axes, counts: np.ndarray) -> None:
    """Write each count in its cell, in a colour readable on the colormap."""
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), v in np.ndenumerate(counts):
        colour = "black" if v > threshold else "white"
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7, color=colour)


def teacher_label(client: int, archs: Mapping[int, str] | None = None) -> str:
    """``"client 3 (cnn_small)"``, or ``"client 3"`` when the architecture is unknown."""
    arch = (archs or {}).get(int(client))
    return f"client {int(client)} ({arch})" if arch else f"client {int(client)}"


def teacher_grid(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean overall weight per teacher and round, over every id and round in range.

    Parameters
    ----------
    rows : list[dict]
        ``teachers.parquet`` rows (``round``, ``client``, ``weight``, optional ``class`` and
        ``source``); per-class rows (``class`` >= 0), the ensemble's own rows (``client`` -1)
        and rows measured on the validation split (``source`` ``"val"``) are ignored,
        repeated (client, round) pairs (seeds) are averaged.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        Client ids ``min..max``, rounds ``min..max`` and the ``(clients, rounds)`` mean
        weights, NaN where a client was no teacher in that round.
    """
    rows = [t for t in rows if t.get("class", -1) in (-1, None)
            and not _is_missing(t.get("weight")) and int(t["client"]) >= 0
            and t.get("source") != "val"]
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0))
    cid = np.array([int(t["client"]) for t in rows])
    rnd = np.array([int(t["round"]) for t in rows])
    w = np.array([float(t["weight"]) for t in rows])
    clients = np.arange(cid.min(), cid.max() + 1)
    rounds = np.arange(rnd.min(), rnd.max() + 1)
    total = np.zeros((clients.size, rounds.size))
    n = np.zeros_like(total)
    np.add.at(total, (cid - clients[0], rnd - rounds[0]), w)
    np.add.at(n, (cid - clients[0], rnd - rounds[0]), 1)
    mean = np.divide(total, n, out=np.full_like(total, np.nan), where=n > 0)
    return clients, rounds, mean


def draw_teacher_weights(ax: Axes, rows: list[dict[str, Any]],
                         archs: Mapping[int, str] | None = None,
                         max_lines: int = TEACHER_LINES_MAX) -> AxesImage | None:
    """Draw teacher weights over rounds on ``ax``: labelled lines, or a heat-map when many.

    Parameters
    ----------
    ax : Axes
        Target axes (a colorbar is added beside it for the heat-map).
    rows : list[dict]
        ``teachers.parquet`` rows, see `teacher_grid`.
    archs : Mapping[int, str], optional
        Architecture per client id, for the labels ``"client 3 (cnn_small)"``.
    max_lines : int
        Most teachers drawn as lines; more give a teacher x round heat-map.

    Returns
    -------
    AxesImage | None
        The heat-map image, or ``None`` when lines (or nothing) were drawn.
    """
    clients, rounds, mean = teacher_grid(rows)
    present = ~np.isnan(mean).all(axis=1) if mean.size else np.zeros(0, bool)
    integer_ticks(ax.xaxis)
    ax.set_xlabel("round")
    if present.sum() <= max_lines:
        for c, row in zip(clients[present], mean[present], strict=True):
            ok = ~np.isnan(row)
            ax.plot(rounds[ok], row[ok], marker=".", lw=0.8, label=teacher_label(c, archs))
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
        if present.any():
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        return None
    cmap = colormaps["viridis"].with_extremes(bad="0.92")
    im = ax.imshow(np.ma.masked_invalid(mean), aspect="auto", interpolation="nearest",
                   origin="lower", cmap=cmap,
                   extent=(rounds[0] - 0.5, rounds[-1] + 0.5, clients[0] - 0.5,
                           clients[-1] + 0.5))
    ax.figure.colorbar(im, ax=ax, label="weight")
    ax.set_ylabel("teacher (client id)")
    shown = clients[present]
    if archs and shown.size <= 40:
        ax.set_yticks(shown, labels=[f"{c} ({archs[int(c)]})" if int(c) in archs else str(c)
                                     for c in shown], fontsize=6)
    else:
        integer_ticks(ax.yaxis)
    return im


def teachers_figure(rows: list[dict[str, Any]], archs: Mapping[int, str] | None = None,
                    title: str = "") -> Figure | None:
    """One run's teacher weights over rounds (see `draw_teacher_weights`).

    Parameters
    ----------
    rows : list[dict]
        ``teachers.parquet`` rows.
    archs : Mapping[int, str], optional
        Architecture per client id (``partition.parquet``'s ``client`` / ``arch``).
    title : str
        Axes title.

    Returns
    -------
    Figure | None
        The figure, or ``None`` when there are no overall (``class`` -1) weights.
    """
    if not teacher_grid(rows)[2].size:
        return None
    fig = Figure(figsize=(8.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw_teacher_weights(ax, rows, archs)
    ax.set_title(title, fontsize=9)
    return fig


def plot_teachers(rows: list[dict[str, Any]], path: Path,
                  archs: Mapping[int, str] | None = None, title: str = "") -> bool:
    """Write one run's teacher-weight figure (see `teachers_figure`) as PNG.

    Parameters
    ----------
    rows : list[dict]
        ``teachers.parquet`` rows.
    path : Path
        Output PNG.
    archs : Mapping[int, str], optional
        Architecture per client id.
    title : str
        Axes title.

    Returns
    -------
    bool
        False (and nothing written) when there are no teacher weights.
    """
    fig = teachers_figure(rows, archs, title)
    if fig is None:
        return False
    _save(fig, path)
    return True


def _save(fig: Figure, path: Path) -> None:
    """Render a figure with the Agg backend and save it as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)


#: Labels on every exported series, so that several runs can share one Prometheus.
PROM_LABELS = ("scenario", "run", "strategy")


class PromExporter:
    """Prometheus metrics for a running simulation, served on its own registry.

    Every series carries the labels :data:`PROM_LABELS` (scenario name, run folder name,
    strategy name), so one Prometheus can scrape several runs and a dashboard can tell them
    apart. Exported: the gauges ``fedkd_round``, ``fedkd_test_accuracy`` and
    ``fedkd_test_loss``, and the counters ``fedkd_bytes_down`` and ``fedkd_bytes_up`` (exposed
    as ``fedkd_bytes_down_total`` / ``fedkd_bytes_up_total``).

    Parameters
    ----------
    port : int
        TCP port of the HTTP endpoint (0: any free port; :attr:`port` is the one bound).
    host : str (default: "127.0.0.1")
        Address to bind.
    scenario, run, strategy : str (default: "")
        Label values: the scenario's name, the run folder's name and the strategy's name.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", *, scenario: str = "",
                 run: str = "", strategy: str = "") -> None:
        self.host = host
        self.labels = {"scenario": scenario, "run": run, "strategy": strategy}
        self.registry = CollectorRegistry()

        def series(kind: type[Gauge] | type[Counter], name: str, doc: str) -> Any:
            return kind(name, doc, PROM_LABELS, registry=self.registry).labels(**self.labels)

        self.round = series(Gauge, "fedkd_round", "Last completed round")
        self.accuracy = series(Gauge, "fedkd_test_accuracy", "Test accuracy")
        self.loss = series(Gauge, "fedkd_test_loss", "Test loss")
        self.bytes_down = series(Counter, "fedkd_bytes_down", "Bytes sent server -> clients")
        self.bytes_up = series(Counter, "fedkd_bytes_up", "Bytes sent clients -> server")
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = started if started else (None, None)
        self.port = self._server.server_port if self._server is not None else port

    def update(
        self, round: int, acc: float | None, loss: float | None, bytes_down: int, bytes_up: int
    ) -> None:
        """Record one finished round.

        Parameters
        ----------
        round : int
            Round number.
        acc, loss : float | None
            Test metrics; ``None`` leaves the previous value.
        bytes_down, bytes_up : int
            Traffic of this round (increments).
        """
        self.round.set(round)
        if not _is_missing(acc):
            self.accuracy.set(acc)
        if not _is_missing(loss):
            self.loss.set(loss)
        self.bytes_down.inc(bytes_down)
        self.bytes_up.inc(bytes_up)

    def close(self) -> None:
        """Stop the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if isinstance(self._thread, threading.Thread):
            self._thread.join(timeout=5)
            self._thread = None
