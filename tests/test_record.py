"""Tests for fedkd.record."""

from __future__ import annotations

import math
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedkd.record import (
    PARTITION_HEATMAP_MAX_CLIENTS,
    TEACHER_LINES_MAX,
    ParquetLog,
    PromExporter,
    _share_image,
    accuracy_figure,
    partition_figure,
    plot_accuracy,
    plot_partition,
    plot_teachers,
    teacher_grid,
    teachers_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_parquet_log_rewrites_after_each_call(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.parquet"
    log = ParquetLog(path)
    log.append({"round": 1, "acc": 0.5, "bytes_down": 100})
    assert _read(path) == [{"round": 1, "acc": 0.5, "bytes_down": 100}]
    log.append({"round": 2, "acc": None, "bytes_down": 200, "acc/cnn_small": 0.25})
    log.extend([{"round": 3, "acc": 1, "note": "x"}, {"round": 4}])
    rows = _read(path)
    assert rows == [
        {"round": 1, "acc": 0.5, "bytes_down": 100, "acc/cnn_small": None, "note": None},
        {"round": 2, "acc": None, "bytes_down": 200, "acc/cnn_small": 0.25, "note": None},
        {"round": 3, "acc": 1.0, "bytes_down": None, "acc/cnn_small": None, "note": "x"},
        {"round": 4, "acc": None, "bytes_down": None, "acc/cnn_small": None, "note": None},
    ]
    schema = pq.read_schema(path)
    assert str(schema.field("round").type) == "int64"
    assert str(schema.field("acc").type) == "double"
    assert len(log.rows) == 4 and log.rows[0] == {"round": 1, "acc": 0.5, "bytes_down": 100}
    assert not path.with_suffix(".tmp").exists()


def test_parquet_log_all_null_column(tmp_path: Path) -> None:
    log = ParquetLog(tmp_path / "m.parquet")
    log.extend([{"round": 1, "loss": None}, {"round": 2, "loss": None}])
    assert _read(tmp_path / "m.parquet") == [{"round": 1, "loss": None}, {"round": 2, "loss": None}]


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_accuracy(tmp_path: Path) -> None:
    rows = [
        {
            "round": r,
            "acc": None if r == 2 else 0.1 * r,
            "acc/cnn_small": math.nan if r == 1 else 0.05 * r,
            "loss": 1.0 / r,
            "bytes_down_cum": 1_000_000 * r,
            "bytes_up_cum": 500_000 * r,
        }
        for r in range(1, 6)
    ]
    out = tmp_path / "plots" / "accuracy.png"
    plot_accuracy(rows, out)
    assert _is_png(out)


def test_accuracy_figure_draws_personalised_accuracy() -> None:
    rows = [{"round": r, "acc": 0.1 * r, "acc-min": 0.05 * r, "local-acc": 0.2 * r,
             "local-acc-worst10": 0.1 * r, "local-acc-std": 0.01, "local-loss": 1.0,
             "bytes_down_cum": r, "bytes_up_cum": 0} for r in (1, 2)]
    ax_round = accuracy_figure(rows).axes[0]
    labels = [line.get_label() for line in ax_round.get_lines()]
    assert labels == ["acc", "acc-min", "local-acc", "local-acc-worst10"]  # no std, no loss
    local = ax_round.get_lines()[2]
    assert list(local.get_xdata()) == [1, 2]
    assert list(local.get_ydata()) == pytest.approx([0.2, 0.4])


def test_parquet_log_keeps_personalised_columns(tmp_path: Path) -> None:
    log = ParquetLog(tmp_path / "metrics.parquet")
    log.append({"round": 1, "acc": 0.5})
    log.append({"round": 2, "acc": 0.6, "local-acc": 0.75, "local-acc-worst10": 0.25,
                "local-acc-std": 0.125})
    rows = _read(log.path)
    assert rows[0]["local-acc"] is None
    assert (rows[1]["local-acc"], rows[1]["local-acc-worst10"], rows[1]["local-acc-std"]) == (
        0.75, 0.25, 0.125)


def test_plot_accuracy_without_acc(tmp_path: Path) -> None:
    out = tmp_path / "empty.png"
    plot_accuracy([{"round": 1, "bytes_down_cum": 0, "bytes_up_cum": 0}], out)
    assert _is_png(out)


@pytest.mark.parametrize("shape", [(5, 10), (60, 100)])
def test_plot_partition(tmp_path: Path, shape: tuple[int, int]) -> None:
    counts = np.random.default_rng(0).integers(0, 50, size=shape)
    out = tmp_path / "partition.png"
    plot_partition(counts, out, "dirichlet alpha=0.5")
    assert _is_png(out)


def _visible_ticks(ax: Axes, which: str) -> np.ndarray:
    """Major tick locations of ``ax``'s x or y axis inside its view limits, after drawing."""
    ax.figure.canvas.draw()
    ticks = ax.get_xticks() if which == "x" else ax.get_yticks()
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    return ticks[(ticks >= lo - 1e-9) & (ticks <= hi + 1e-9)]


def _assert_integer_ticks(ax: Axes, which: str) -> None:
    ticks = _visible_ticks(ax, which)
    assert ticks.size, f"no {which} ticks"
    assert np.allclose(ticks, np.round(ticks)), f"non-integer {which} ticks {ticks}"


@pytest.mark.parametrize("n_rounds", [1, 2, 3, 7, 250])
def test_accuracy_round_axis_has_integer_ticks(n_rounds: int) -> None:
    rows = [{"round": r, "acc": 0.1 + 0.001 * r, "bytes_down_cum": 1000 * r,
             "bytes_up_cum": 0} for r in range(1, n_rounds + 1)]
    fig = accuracy_figure(rows)
    ax_round, ax_mb = fig.axes
    assert ax_round.get_xlabel() == "round" and ax_mb.get_xlabel().startswith("cumulative")
    _assert_integer_ticks(ax_round, "x")


@pytest.mark.parametrize("shape", [(2, 3), (5, 10), (PARTITION_HEATMAP_MAX_CLIENTS, 4)])
def test_small_partition_is_heatmap_with_integer_ticks(shape: tuple[int, int]) -> None:
    counts = np.random.default_rng(1).integers(0, 50, size=shape)
    fig = partition_figure(counts, "t")
    ax = fig.axes[0]
    assert len(ax.images) == 1 and ax.images[0].get_array().shape == shape
    assert ax.get_ylabel() == "client" and ax.get_xlabel() == "class"
    _assert_integer_ticks(ax, "x")
    _assert_integer_ticks(ax, "y")


def _dirichlet_counts(n_clients: int, n_classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet([0.3] * n_classes, size=n_clients)
    sizes = rng.integers(0, 400, size=n_clients)
    return np.round(shares * sizes[:, None]).astype(np.int64)


def test_large_partition_is_fast_readable_and_integer(tmp_path: Path) -> None:
    counts = _dirichlet_counts(2000, 10)
    out = tmp_path / "partition.png"
    start = time.perf_counter()
    plot_partition(counts, out, "dirichlet alpha=0.3, 2,000 clients")
    assert time.perf_counter() - start < 3.0
    assert _is_png(out)
    fig = partition_figure(counts, "t")
    shares_ax, sizes_ax, totals_ax, note_ax = fig.axes[:4]
    # one image for all clients, not an artist per client
    assert len(shares_ax.images) == 1 and shares_ax.images[0].get_array().shape[1] == 2000
    assert len(shares_ax.patches) == 0 and len(shares_ax.collections) <= 1
    assert sizes_ax.get_xlabel().startswith("client rank")
    _assert_integer_ticks(sizes_ax, "x")
    _assert_integer_ticks(totals_ax, "y")
    assert [int(p.get_width()) for p in totals_ax.patches] == counts.sum(axis=0).tolist()
    note = note_ax.texts[0].get_text()
    assert "2,000 clients" in note and f"{int(counts.sum()):,} examples" in note


def test_share_image_stacks_largest_share_first_and_blanks_empty_clients() -> None:
    shares = np.array([[0.25, 0.75], [0.0, 0.0], [1.0, 0.0]])
    colors = [(1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0)]
    img = _share_image(shares, colors, height=8)
    assert img.shape == (8, 3, 4) and img.dtype == np.uint8
    red, blue, white = [255, 0, 0, 255], [0, 0, 255, 255], [255, 255, 255, 255]
    assert img[:6, 0].tolist() == [blue] * 6 and img[6:, 0].tolist() == [red] * 2
    assert img[:, 1].tolist() == [white] * 8
    assert img[:, 2].tolist() == [red] * 8


def _teacher_rows(n_teachers: int, rounds: int = 4) -> list[dict]:
    rows = [{"round": r, "client": c, "class": -1, "weight": 1 / n_teachers}
            for r in range(1, rounds + 1) for c in range(n_teachers)]
    # per-class rows are not overall weights: ignored
    return rows + [{"round": 1, "client": 0, "class": 3, "weight": 9.0}]


ARCHS = {0: "cnn_small", 1: "cnn_big", 2: "mlp", 3: "cnn_small"}


def test_teacher_lines_are_labelled_with_client_and_arch() -> None:
    fig = teachers_figure(_teacher_rows(4), ARCHS)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["client 0 (cnn_small)", "client 1 (cnn_big)", "client 2 (mlp)",
                      "client 3 (cnn_small)"]
    assert not ax.images
    assert max(max(line.get_ydata()) for line in ax.get_lines()) == pytest.approx(0.25)
    _assert_integer_ticks(ax, "x")
    unknown = teachers_figure(_teacher_rows(2)).axes[0]
    assert [t.get_text() for t in unknown.get_legend().get_texts()] == ["client 0", "client 1"]


def test_many_teachers_give_a_heatmap_with_integer_ticks() -> None:
    n = TEACHER_LINES_MAX + 5
    rows = [r for r in _teacher_rows(n, rounds=3) if not (r["client"] == 4 and r["round"] == 2)]
    fig = teachers_figure(rows)
    ax = fig.axes[0]
    assert len(ax.images) == 1 and not ax.get_lines()
    grid = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    assert grid.shape == (n, 3) and np.isnan(grid[4, 1]) and np.nansum(grid) == pytest.approx(
        3 - 1 / n)
    assert len(fig.axes) == 2  # the colorbar
    _assert_integer_ticks(ax, "x")
    _assert_integer_ticks(ax, "y")
    labelled = teachers_figure(rows, {c: "mlp" for c in range(n)}).axes[0]
    assert labelled.get_yticklabels()[3].get_text() == "3 (mlp)"


def test_teacher_grid_averages_repeats() -> None:
    rows = [{"round": 2, "client": 5, "weight": 0.2}, {"round": 2, "client": 5, "weight": 0.4},
            {"round": 4, "client": 7, "weight": 1.0, "class": None}]
    clients, rounds, mean = teacher_grid(rows)
    assert clients.tolist() == [5, 6, 7] and rounds.tolist() == [2, 3, 4]
    assert mean[0, 0] == pytest.approx(0.3) and mean[2, 2] == 1.0
    assert np.isnan(mean[1]).all()


def test_plot_teachers(tmp_path: Path) -> None:
    assert plot_teachers(_teacher_rows(3), tmp_path / "t.png", ARCHS, "feddf")
    assert _is_png(tmp_path / "t.png")
    assert not plot_teachers([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("fedkd_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_prom_exporter_serves_metrics() -> None:
    a = PromExporter(_free_port())
    b = PromExporter(_free_port())
    try:
        a.update(1, 0.5, 1.25, 1000, 300)
        a.update(2, None, None, 1000, 200)
        b.update(7, 0.9, 0.1, 1, 2)
        m = _scrape(a.port)
        assert m["fedkd_round"] == 2
        assert m["fedkd_test_accuracy"] == 0.5
        assert m["fedkd_test_loss"] == 1.25
        assert m["fedkd_bytes_down_total"] == 2000
        assert m["fedkd_bytes_up_total"] == 500
        mb = _scrape(b.port)
        assert mb["fedkd_round"] == 7 and mb["fedkd_bytes_up_total"] == 2
    finally:
        a.close()
        b.close()
    a.close()
    with pytest.raises(OSError):
        _scrape(a.port)


def test_accuracy_figure_adds_virtual_time_for_clocked_runs() -> None:
    from fedkd.record import accuracy_figure

    rows = [{"round": r, "acc": 0.1 * r, "bytes_down_cum": r * 10**6, "bytes_up_cum": 0,
             "virtual_time": 2.5 * r} for r in (1, 2, 3)]
    fig = accuracy_figure(rows)
    assert len(fig.axes) == 3 and fig.axes[2].get_xlabel() == "virtual time (s)"
    assert list(fig.axes[2].lines[0].get_xdata()) == [2.5, 5.0, 7.5]
    assert len(accuracy_figure([{k: v for k, v in r.items() if k != "virtual_time"}
                                for r in rows]).axes) == 2
