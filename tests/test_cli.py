"""End-to-end tests of the ``fedkd`` command on tiny data (digits, a few rounds)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_runs import simulate_inline

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")
WALL = {"wall_s", "elapsed_s"}


def fedkd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh process."""
    return subprocess.run([sys.executable, "-m", "fedkd.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def run_dir_of(out: Path) -> Path:
    (run,) = [p for p in out.glob("*/*") if p.is_dir()]
    return run


def simulate(out: Path, *sets: str) -> Path:
    args = ["simulate", QUICKSTART, "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    proc = fedkd(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir_of(out)


def table(path: Path, drop: set[str] = WALL) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


SMALL = ("rounds=2", "clients.fraction=0.5", "clients.train.epochs=1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same small scenario on: Ray (2 actors), Ray with 1 actor, Flower's engine, and the
    inline engine (every client in the driver process) twice, once in this process."""
    base = tmp_path_factory.mktemp("runs")
    return {
        "ray_a": simulate(base / "a", *SMALL, "engine.actors=2"),
        "inline_b": simulate_inline(base / "b", *SMALL),
        "ray_1": simulate(base / "c", *SMALL, "engine.actors=1"),
        "flower": simulate(base / "d", *SMALL, "engine.name=flower"),
        "inline": simulate(base / "e", *SMALL, "engine.name=inline"),
    }


def test_run_folder_contents(runs: dict[str, Path]) -> None:
    run = runs["ray_a"]
    for name in ("scenario.yaml", "metrics.parquet", "clients.parquet", "partition.parquet",
                 "summary.json", "accuracy.png", "partition.png", "engine.log"):
        assert (run / name).stat().st_size > 0, name
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in metrics] == [1, 2]
    assert all(r["participants"] == 5 and r["failures"] == 0 for r in metrics)
    # each of 5 clients receives the model and sends it back: equal bytes both ways
    assert metrics[0]["bytes_down"] == metrics[0]["bytes_up"] > 0
    assert metrics[1]["bytes_down_cum"] == 2 * metrics[0]["bytes_down"]
    clients = pq.read_table(run / "clients.parquet").to_pylist()
    assert len(clients) == 10
    assert sum(c["bytes_up"] for c in clients if c["round"] == 1) == metrics[0]["bytes_up"]
    assert sorted({c["bytes_down"] for c in clients}) == [metrics[0]["bytes_down"] // 5]
    partition = pq.read_table(run / "partition.parquet").to_pylist()
    assert len(partition) == 10
    assert {"acc", "loss", "train_loss", "wall_s", "bytes_up_cum"} <= set(metrics[0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert {"best_acc", "mb_sent", "wall_s"} <= set(summary)
    assert summary["final_acc"] == metrics[-1]["acc"]
    assert "rounds: 2" in (run / "scenario.yaml").read_text()


def test_same_seed_same_metrics(runs: dict[str, Path]) -> None:
    for f in ("metrics.parquet", "clients.parquet"):
        assert table(runs["inline"] / f) == table(runs["inline_b"] / f)


def test_one_vs_two_actors(runs: dict[str, Path]) -> None:
    for f in ("metrics.parquet", "clients.parquet"):
        assert table(runs["ray_a"] / f) == table(runs["ray_1"] / f)


def test_ray_vs_flower_engine(runs: dict[str, Path]) -> None:
    a = table(runs["ray_a"] / "metrics.parquet")
    b = table(runs["flower"] / "metrics.parquet")
    assert a == b
    assert table(runs["ray_a"] / "clients.parquet") == table(runs["flower"] / "clients.parquet")


def test_ray_vs_inline_engine(runs: dict[str, Path]) -> None:
    for f in ("metrics.parquet", "clients.parquet"):
        assert table(runs["ray_a"] / f) == table(runs["inline"] / f)


def test_quickstart_learns(tmp_path: Path) -> None:
    proc = fedkd("simulate", QUICKSTART, "--out", str(tmp_path), "--no-progress",
                 "--set", "rounds=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir_of(tmp_path)
    accs = [r["acc"] for r in pq.read_table(run / "metrics.parquet").to_pylist()]
    assert len(accs) == 3
    assert accs[-1] > 0.3  # well above chance (0.1) after 3 rounds
    assert accs[-1] > accs[0]
    # the closing lines README describes: final and best accuracy, MB sent, run folder
    assert f"final accuracy {accs[-1]:.4f}, best {max(accs):.4f}" in proc.stdout
    assert " MB sent, " in proc.stdout and f"run folder: {run}" in proc.stdout


@pytest.mark.slow
def test_demo_reaches_95_percent(tmp_path: Path) -> None:
    """README: ``make demo`` (20 rounds of the quickstart) reaches about 95% test accuracy."""
    run = simulate(tmp_path)
    accs = [r["acc"] for r in pq.read_table(run / "metrics.parquet").to_pylist()]
    assert len(accs) == 20 and accs[-1] >= 0.93


def test_eval_every_and_dropout(tmp_path: Path) -> None:
    """``eval_every: 2`` tests rounds 2 and 3 (the last); ``dropout`` makes clients fail."""
    run = simulate_inline(tmp_path, "rounds=3", "eval_every=2", "clients.dropout=0.5",
                          "clients.train.epochs=1")
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["acc"] is not None for r in rows] == [False, True, True]
    assert sum(r["failures"] for r in rows) > 0
    assert all(r["participants"] == 10 and r["failures"] < 10 for r in rows)  # sampled


def test_local_sends_nothing(tmp_path: Path) -> None:
    """``local``: nothing crosses the network; ``acc`` is the mean of the clients' accuracy."""
    run = simulate_inline(tmp_path, "rounds=2", "strategy.name=local", "clients.num=4",
                          "clients.train.epochs=1")
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert all(r["bytes_down"] == r["bytes_up"] == 0 for r in rows)
    clients = [c for c in pq.read_table(run / "clients.parquet").to_pylist()
               if c["round"] == 2 and c.get("eval_acc") is not None]
    assert len(clients) == 4
    assert rows[-1]["acc"] == pytest.approx(sum(c["eval_acc"] for c in clients) / 4)


def test_engine_and_ray_address_flags_are_scenario_overrides() -> None:
    from fedkd.cli import _overrides, build_parser

    args = build_parser().parse_args(["simulate", "s.yaml", "--set", "rounds=2", "--engine",
                                      "flower", "--ray-address", "auto"])
    assert _overrides(args) == ["rounds=2", "engine.name=flower", "engine.ray_address=auto"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes() -> int:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if "raylet" in line or "gcs_server" in line)


def test_terminated_run_keeps_rounds_and_serves_metrics(tmp_path: Path) -> None:
    before = _ray_processes()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedkd.cli", "simulate", QUICKSTART, "--out", str(tmp_path),
         "--no-progress", "--metrics-port", str(port), "--set", "rounds=200"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        metrics = None
        while time.monotonic() < deadline:
            runs = list(tmp_path.glob("*/*/metrics.parquet"))
            if runs and pq.read_table(runs[0]).num_rows >= 2:
                metrics = runs[0]
                break
            time.sleep(0.2)
        assert metrics is not None, "no two rounds recorded in time"
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = page.decode()
        assert "fedkd_round" in text and "fedkd_bytes_down_total" in text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    rows = pq.read_table(metrics).to_pylist()
    assert [r["round"] for r in rows][:2] == [1, 2]
    summary = json.loads((metrics.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    time.sleep(1.0)
    assert _ray_processes() <= before


def test_bad_value_is_one_line(tmp_path: Path) -> None:
    proc = fedkd("simulate", QUICKSTART, "--set", "partition.params.alpha=0", "--out",
                 str(tmp_path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["fedkd: error: partition.params.alpha: got 0; allowed: a number > 0"]


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI's exit code, standard output and error, run in this process (the commands
    that start no engine; one-line errors in a fresh process: the test above)."""
    from fedkd.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_key_lists_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = in_process(capsys, "validate", QUICKSTART, "--set", "clients.fracton=0.5")
    assert code == 2
    assert err.count("\n") == 1
    assert "clients.fracton" in err and "'fraction'" in err


def test_missing_cifar10_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = in_process(capsys, "validate", QUICKSTART, "--set", "data.name=cifar10",
                              "--set", f"data.root={tmp_path}", "--set", "data.download=false")
    assert code == 2
    assert err.count("\n") == 1, err
    assert str(tmp_path) in err and "download: true" in err


def test_list_and_partition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = in_process(capsys, "list")
    assert code == 0
    assert "dirichlet" in out and "fedavg" in out and "resnet8" in out
    assert "codecs: bf16, fp16, fp32, int8, logit_topk, qsgd, soft_label, topk" in out
    png = tmp_path / "p.png"
    code, out, err = in_process(capsys, "partition", QUICKSTART, "--png", str(png))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + 10 + 1  # header, 10 clients, heat-map path
    totals = [int(line.split()[-1]) for line in lines[1:11]]
    assert sum(totals) == 1437 - 144 - 144  # digits train minus val and public (10 % each)
    assert png.stat().st_size > 0


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = in_process(capsys, "validate", QUICKSTART)
    assert code == 0, err
    assert "valid" in out and "10 clients" in out
