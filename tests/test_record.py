"""Tests for fedkd.record."""

from __future__ import annotations

import math
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fedkd.record import ParquetLog, PromExporter, plot_accuracy, plot_partition

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
