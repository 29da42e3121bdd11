"""A real two-node Ray cluster on loopback: a head and a second node, each with its own
resources, a stateful strategy (FedMD) with the state actor (no shared filesystem needed),
clients on both nodes, the same metrics as a local run with the same seed; both nodes are
stopped whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
RUN = ["rounds=2", "clients.num=4", "clients.train.steps=3", "clients.train.batch_size=16",
       "partition.params.min_size=5", "strategy.name=fedmd",
       "strategy.params.alignment_size=40", "strategy.params.pretrain_public_epochs=1",
       "strategy.params.pretrain_private_epochs=1", "engine.actors=2",
       "engine.client_resources.num_cpus=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path, tmp: str) -> subprocess.Popen[bytes]:
    """``ray start ... --block`` in its own process group (stopped by killing the group),
    with its own temporary folder: a local Ray started later must not find this cluster."""
    return subprocess.Popen([str(RAY), "start", *args, "--block", "--disable-usage-stats"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "RAY_TMPDIR": tmp})


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@contextlib.contextmanager
def two_nodes(tmp_path: Path) -> Iterator[str]:
    """A Ray head (1 CPU) and a second node (1 CPU) on 127.0.0.1; yields the address."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="fedkd-ray-", dir="/tmp")  # short: Ray's socket paths
    head = _start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                   "--num-cpus", "1", "--resources", '{"head_node": 1}',
                   "--include-dashboard=false"], tmp_path / "head.log", tmp)
    nodes = [head]
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's GCS port accepts connections once it is up
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "head.log").read_text()[-2000:])
            time.sleep(0.5)
        nodes.append(_start(["--address", address, "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "1", "--resources", '{"second_node": 1}'],
                            tmp_path / "node.log", tmp))
        yield address
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _simulate(out: Path, *extra: str) -> Path:
    args = [sys.executable, "-m", "fedkd.cli", "simulate", "scenarios/quickstart.yaml",
            "--out", str(out), "--no-progress"]
    for o in [*RUN, *extra]:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in out.glob("*/*") if p.is_dir()]
    return run


def _metrics(run: Path) -> list[tuple]:
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    return [(r["round"], r["acc"], r["loss"], r["train_loss"], r["bytes_up"]) for r in rows]


def test_stateful_run_on_two_nodes_equals_a_local_run(tmp_path: Path) -> None:
    local = _simulate(tmp_path / "local")
    assert (local / "state").exists()
    with two_nodes(tmp_path) as address:
        cluster = _simulate(tmp_path / "cluster", f"engine.ray_address={address}",
                            "engine.state_store=actor")
    placement = json.loads((cluster / "placement.json").read_text())
    assert len(placement["nodes"]) == 2  # one actor on each node
    assert set(placement["clients"].values()) == set(placement["nodes"])  # clients ran on both
    assert not (cluster / "state").exists()  # the clients' models never touched the disk
    assert _metrics(cluster) == _metrics(local)


def test_state_actor_needs_ray() -> None:
    from fedkd.compose import load_scenario, prepare
    from fedkd.errors import ScenarioError

    scn = load_scenario(ROOT / "scenarios" / "quickstart.yaml",
                        ["engine.state_store=actor", "engine.name=inline"])
    try:
        prepare(scn)
    except ScenarioError as err:
        assert err.path == "engine.state_store"
    else:
        raise AssertionError("the state actor on the inline engine should be refused")
