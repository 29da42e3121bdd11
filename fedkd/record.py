"""Run records: Parquet logs, plots and a Prometheus exporter."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
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


def _acc_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns whose name starts with ``acc``, in first-seen order."""
    return [c for c in dict.fromkeys(k for r in rows for k in r) if c.startswith("acc")]


def _cum_mb(row: dict[str, Any]) -> float:
    """Cumulative traffic of a row in MB."""
    return (row.get("bytes_down_cum", 0) + row.get("bytes_up_cum", 0)) / 1e6


def plot_accuracy(metrics_rows: list[dict[str, Any]], path: Path) -> None:
    """Plot accuracy against round and against cumulative traffic.

    Parameters
    ----------
    metrics_rows : list[dict]
        Per-round rows with ``round``, ``bytes_down_cum``, ``bytes_up_cum`` and ``acc*`` columns.
    path : Path
        Output PNG.
    """
    fig = Figure(figsize=(11, 4))
    ax_r, ax_b = fig.subplots(1, 2)
    for col in _acc_columns(metrics_rows):
        rows = [r for r in metrics_rows if not _is_missing(r.get(col))]
        acc = [float(r[col]) for r in rows]
        ax_r.plot([r["round"] for r in rows], acc, marker=".", label=col)
        ax_b.plot([_cum_mb(r) for r in rows], acc, marker=".", label=col)
    ax_r.set_xlabel("round")
    ax_b.set_xlabel("cumulative traffic (MB)")
    for ax in (ax_r, ax_b):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    _save(fig, path)


def plot_partition(counts: np.ndarray, path: Path, title: str) -> None:
    """Heat-map of examples per client (rows) and class (columns).

    Parameters
    ----------
    counts : np.ndarray
        Integer matrix of shape ``(num_clients, num_classes)``.
    path : Path
        Output PNG.
    title : str
        Figure title.
    """
    counts = np.asarray(counts)
    n_clients, n_classes = counts.shape
    fig = Figure(figsize=(max(4, 0.5 * n_classes + 2), max(3, 0.3 * n_clients + 1.5)))
    ax = fig.subplots()
    im = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="examples")
    if counts.size <= 400:
        _annotate(ax, counts)
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(title)
    _save(fig, path)


def _annotate(ax: Axes, counts: np.ndarray) -> None:
    """Write each count in its cell, in a colour readable on the colormap."""
    threshold = counts.max() / 2 if counts.size else 0
    for (i, j), v in np.ndenumerate(counts):
        colour = "black" if v > threshold else "white"
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=7, color=colour)


def _save(fig: Figure, path: Path) -> None:
    """Render a figure with the Agg backend and save it as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)


class PromExporter:
    """Prometheus metrics for a running simulation, served on its own registry.

    Parameters
    ----------
    port : int
        TCP port of the HTTP endpoint.
    host : str
        Address to bind.
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.registry = CollectorRegistry()
        self.round = Gauge("fedkd_round", "Last completed round", registry=self.registry)
        self.accuracy = Gauge("fedkd_test_accuracy", "Test accuracy", registry=self.registry)
        self.loss = Gauge("fedkd_test_loss", "Test loss", registry=self.registry)
        self.bytes_down = Counter(
            "fedkd_bytes_down", "Bytes sent server -> clients", registry=self.registry
        )
        self.bytes_up = Counter(
            "fedkd_bytes_up", "Bytes sent clients -> server", registry=self.registry
        )
        started = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = started if started else (None, None)

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
