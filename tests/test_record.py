"""Tests for fedkd.record."""

from __future__ import annotations

import math
import socket
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from flwr.app import ArrayRecord
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families

import fedkd.engine.recorder as recorder_module
from fedkd.compose import load_scenario
from fedkd.engine.recorder import RunRecorder
from fedkd.engine.runner import RoundResult, Traffic
from fedkd.errors import ScenarioError
from fedkd.record import (
    PARTITION_HEATMAP_MAX_CLIENTS,
    PROM_LABELS,
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
from fedkd.scenario import Scenario, parse_scenario
from fedkd.trackers import build_trackers, check_trackers, flatten, numeric_metrics
from fedkd.world import World, build_world

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICKSTART = Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml"


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


def _scrape(port: int) -> dict[str, tuple[dict[str, str], float]]:
    """Every ``fedkd_*`` sample served on ``port``: name -> (labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: dict[str, tuple[dict[str, str], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("fedkd_"):
                assert s.name not in samples, f"two series of {s.name}"
                samples[s.name] = (s.labels, s.value)
    return samples


def _values(samples: dict[str, tuple[dict[str, str], float]]) -> dict[str, float]:
    return {name: value for name, (_, value) in samples.items()}


RUN_A = {"scenario": "quickstart", "run": "20260101-120000", "strategy": "feddf"}
RUN_B = {"scenario": "noniid_fashion", "run": "20260101-120000-2", "strategy": "fedavg"}


def test_prom_exporter_serves_labelled_metrics() -> None:
    a = PromExporter(_free_port(), **RUN_A)
    b = PromExporter(0, **RUN_B)  # port 0: any free port, reported back
    try:
        assert b.port > 0 and PROM_LABELS == ("scenario", "run", "strategy")
        a.update(1, 0.5, 1.25, 1000, 300)
        a.update(2, None, None, 1000, 200)
        b.update(7, 0.9, 0.1, 1, 2)
        sa, sb = _scrape(a.port), _scrape(b.port)
        m = _values(sa)
        assert m["fedkd_round"] == 2
        assert m["fedkd_test_accuracy"] == 0.5
        assert m["fedkd_test_loss"] == 1.25
        assert m["fedkd_bytes_down_total"] == 2000
        assert m["fedkd_bytes_up_total"] == 500
        mb = _values(sb)
        assert mb["fedkd_round"] == 7 and mb["fedkd_bytes_up_total"] == 2
        # every series of a run carries its three labels, so two runs can share a Prometheus
        assert {frozenset(labels.items()) for labels, _ in sa.values()} == {
            frozenset(RUN_A.items())}
        assert {frozenset(labels.items()) for labels, _ in sb.values()} == {
            frozenset(RUN_B.items())}
        assert {"fedkd_round", "fedkd_test_accuracy", "fedkd_test_loss",
                "fedkd_bytes_down_total", "fedkd_bytes_up_total"} <= set(sa)
    finally:
        a.close()
        b.close()
    a.close()
    with pytest.raises(OSError):
        _scrape(a.port)


def test_prom_exporter_binds_loopback_by_default() -> None:
    exporter = PromExporter(0)
    try:
        assert exporter.host == "127.0.0.1"
        assert exporter._server.server_address[0] == "127.0.0.1"
        assert all(labels == {"scenario": "", "run": "", "strategy": ""}
                   for labels, _ in _scrape(exporter.port).values())
    finally:
        exporter.close()


# ----------------------------------------------------------------------------- run recorder


class _Nodes:
    """The one thing RunRecorder asks of a strategy: node id -> client id."""

    def node(self, nid: int) -> SimpleNamespace:
        return SimpleNamespace(cid=nid - 100)


class _ListTracker:
    """A tracker that keeps what it is given."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict]] = []
        self.closed: list[str] = []

    def log_round(self, round: int, metrics: dict) -> None:
        self.rounds.append((round, dict(metrics)))

    def close(self, status: str = "completed") -> None:
        self.closed.append(status)


def _round(rnd: int, acc: float) -> RoundResult:
    return RoundResult(round=rnd, arrays=ArrayRecord(), train_metrics={"train-loss": 0.7},
                       eval_metrics={"acc": acc, "loss": 1.5},
                       traffic={100: Traffic(down=1000, up=400,
                                             metrics={"train-loss": 0.7, "num-examples": 9}),
                                101: Traffic(down=1000, up=0, failed=True)},
                       seconds=0.25)


@pytest.fixture(scope="module")
def quickstart_world() -> World:
    return build_world(load_scenario(QUICKSTART, ["rounds=2", "strategy.name=fedavg"]))


def test_run_recorder_labels_metrics_and_feeds_trackers(
        tmp_path: Path, quickstart_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = _ListTracker()
    built: list[tuple] = []

    def fake_build(scn: Scenario, run_dir: Path, resume_round: int = 0) -> list:
        built.append((scn.name, run_dir, resume_round))
        return [tracker]

    monkeypatch.setattr(recorder_module, "build_trackers", fake_build)
    run_dir = tmp_path / "quickstart" / "20260101-120000"
    run_dir.mkdir(parents=True)
    rec = RunRecorder(quickstart_world, run_dir, _Nodes(), metrics_port=_free_port(),
                      progress=False)
    try:
        rec(_round(1, 0.5))
        rec(_round(2, 0.75))
        scraped = _scrape(rec.prom.port)
    finally:
        summary = rec.close("completed")
    assert built == [("quickstart", run_dir, 0)]
    assert {frozenset(labels.items()) for labels, _ in scraped.values()} == {frozenset(
        {"scenario": "quickstart", "run": "20260101-120000", "strategy": "fedavg"}.items())}
    values = _values(scraped)
    assert values["fedkd_round"] == 2 and values["fedkd_test_accuracy"] == 0.75
    assert values["fedkd_bytes_down_total"] == 4000 and values["fedkd_bytes_up_total"] == 800
    # the trackers get the metrics.parquet row of every round, then the run's status
    assert [r for r, _ in tracker.rounds] == [1, 2]
    assert tracker.rounds == [(r["round"], r) for r in _read(run_dir / "metrics.parquet")]
    row = tracker.rounds[1][1]
    assert row["acc"] == 0.75 and row["bytes_down_cum"] == 4000 and row["failures"] == 1
    assert tracker.closed == ["completed"] and summary["final_acc"] == 0.75


# ----------------------------------------------------------------------------- trackers


def test_trackers_are_off_by_default(tmp_path: Path) -> None:
    scn = parse_scenario({})
    assert not scn.output.tensorboard and scn.output.mlflow_uri is None
    assert build_trackers(scn, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("raw", [{"tensorboard": "yes"}, {"mlflow_uri": ""},
                                 {"mlflow_uri": "  "}, {"mlflow_uri": 5}])
def test_tracker_options_are_checked(raw: dict) -> None:
    key = next(iter(raw))
    with pytest.raises(ScenarioError, match=rf"^output\.{key}: "):
        parse_scenario({"output": raw})


MISSING = [("tensorboard", {"tensorboard": True}, ["tensorboard", "torch.utils.tensorboard"]),
           ("mlflow", {"mlflow_uri": "http://127.0.0.1:5000"}, ["mlflow"])]


def _hide(monkeypatch: pytest.MonkeyPatch, modules: list[str]) -> None:
    """Make ``import`` of each module fail, as when its package is not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(("extra", "output", "modules"), MISSING)
def test_tracker_without_its_package_is_a_one_line_scenario_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str, output: dict,
        modules: list[str]) -> None:
    _hide(monkeypatch, modules)
    scn = parse_scenario({"output": output})
    key = f"output.{next(iter(output))}"
    for call in (lambda: check_trackers(scn.output), lambda: build_trackers(scn, tmp_path)):
        with pytest.raises(ScenarioError) as info:
            call()
        message = str(info.value)
        assert info.value.path == key and "\n" not in message
        assert message.startswith(f"{key}: ") and f"pip install -e '.[{extra}]'" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("extra", "output", "modules"), MISSING)
def test_run_recorder_stops_before_writing_when_a_tracker_package_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quickstart_world: World,
        extra: str, output: dict, modules: list[str]) -> None:
    _hide(monkeypatch, modules)
    world = replace(quickstart_world, scenario=replace(
        quickstart_world.scenario,
        output=replace(quickstart_world.scenario.output, **output)))
    with pytest.raises(ScenarioError, match=rf"\[{extra}\]"):
        RunRecorder(world, tmp_path, _Nodes(), metrics_port=_free_port(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_numeric_metrics_and_flatten() -> None:
    row = {"round": 3, "acc": 0.5, "loss": np.float32(1.5), "participants": 4, "ok": True,
           "flag": np.bool_(False), "name": "x", "missing": None, "nan": math.nan,
           "inf": math.inf}
    assert numeric_metrics(row) == {"acc": 0.5, "loss": 1.5, "participants": 4.0}
    nested = {"data": {"name": "digits", "root": None, "public": {"fraction": 0.1}},
              "clients": {"models": [{"arch": "mlp", "fraction": 1.0}]},
              "strategy": {"params": {}}, "seeds": [], "flag": True}
    assert flatten(nested) == {
        "data.name": "digits", "data.root": "null", "data.public.fraction": "0.1",
        "clients.models.0.arch": "mlp", "clients.models.0.fraction": "1.0",
        "strategy.params": "{}", "seeds": "[]", "flag": "true"}


def _tracked_rows() -> list[dict]:
    return [{"round": 1, "acc": 0.25, "loss": 2.0, "bytes_down": 10, "note": "x"},
            {"round": 2, "acc": 0.5, "loss": None, "bytes_down": 20, "note": "y"}]


def test_tensorboard_tracker_writes_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scn = parse_scenario({"output": {"tensorboard": True}})
    (tracker,) = build_trackers(scn, tmp_path)
    for row in _tracked_rows():
        tracker.log_round(row["round"], row)
    tracker.close("completed")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"acc", "loss", "bytes_down"}
    assert [(e.step, e.value) for e in events.Scalars("acc")] == [(1, 0.25), (2, 0.5)]
    assert [e.step for e in events.Scalars("loss")] == [1]


def test_mlflow_tracker_logs_params_and_rounds(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    scn = parse_scenario({"name": "tracked", "output": {"mlflow_uri": uri},
                          "strategy": {"name": "feddf"}})
    run_dir = tmp_path / "runs" / "tracked" / "20260101-120000"
    (tracker,) = build_trackers(scn, run_dir)
    for row in _tracked_rows():
        tracker.log_round(row["round"], row)
    tracker.close("interrupted")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "20260101-120000" and run.info.status == "KILLED"
    assert client.get_experiment(run.info.experiment_id).name == "tracked"
    assert run.data.params["strategy.name"] == "feddf"
    assert run.data.params["clients.models.0.arch"] == scn.clients.models[0].arch
    history = client.get_metric_history(tracker.run_id, "acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.25), (2, 0.5)]


def test_accuracy_figure_adds_virtual_time_for_clocked_runs() -> None:
    from fedkd.record import accuracy_figure

    rows = [{"round": r, "acc": 0.1 * r, "bytes_down_cum": r * 10**6, "bytes_up_cum": 0,
             "virtual_time": 2.5 * r} for r in (1, 2, 3)]
    fig = accuracy_figure(rows)
    assert len(fig.axes) == 3 and fig.axes[2].get_xlabel() == "virtual time (s)"
    assert list(fig.axes[2].lines[0].get_xdata()) == [2.5, 5.0, 7.5]
    assert len(accuracy_figure([{k: v for k, v in r.items() if k != "virtual_time"}
                                for r in rows]).axes) == 2
