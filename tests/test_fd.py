"""FD / FedDistill: class means, per-class aggregation and both distances pinned on toy tensors;
β = 0 is training alone; the upload is exactly one C x C logits record, for any architecture."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from grids import run_in_process

from fedkd.checkpoint import load_strategy_state, strategy_state
from fedkd.client import ClientEnv, train_config_record
from fedkd.comm import array_bytes
from fedkd.compose import load_scenario
from fedkd.engine.runner import RoundResult
from fedkd.errors import ScenarioError
from fedkd.state import StateStore
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.fd import (
    TRAIN_TYPE,
    ClassStats,
    aggregate_class_means,
    class_mse,
    class_record,
    class_soft_ce,
    train_fd,
)
from strategies.local import train_local

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
SMALL = ("clients.num=4", "clients.train.epochs=1", "rounds=2")
HETERO = "clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.5}]"
#: one upload for 10 classes: a 10 x 10 float32 .npy (128-byte header + 400 bytes) and a
#: 10-entry int64 .npy (128 + 80)
LOGITS_BYTES = 128 + 10 * 10 * 4 + 128 + 10 * 8


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- pure functions
def test_class_stats_average_each_class() -> None:
    stats = ClassStats(num_classes=3, dim=2)
    stats.add(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0, 0]))
    stats.add(torch.tensor([[5.0, 6.0]]), torch.tensor([2]))
    assert stats.means().tolist() == [[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]
    assert stats.seen.tolist() == [2, 0, 1]


def test_aggregate_over_holders_uniform_and_by_counts() -> None:
    """Client A holds classes 0, 1 (1 and 3 samples), B holds 0, 2 (3 and 2); nobody holds 3."""
    means = np.array([[[1, 1], [2, 2], [9, 9], [9, 9]],
                      [[3, 5], [9, 9], [4, 4], [9, 9]]], dtype=np.float32)
    counts = np.array([[1, 3, 0, 0], [3, 0, 2, 0]])
    out, total = aggregate_class_means(means, counts, "uniform")
    assert out.tolist() == [[2.0, 3.0], [2.0, 2.0], [4.0, 4.0], [0.0, 0.0]]
    assert total.tolist() == [4, 3, 2, 0] and out.dtype == np.float32
    out, _ = aggregate_class_means(means, counts, "counts")
    assert out.tolist() == [[2.5, 4.0], [2.0, 2.0], [4.0, 4.0], [0.0, 0.0]]  # (1·1 + 3·3) / 4


def test_mse_distance_by_hand() -> None:
    """Row 0 (class 0) against target (1, 2): 1 + 4; row 1 (class 1, no target) adds 0;
    mean over the 2 x 2 entries: 5 / 4 (nn.MSELoss as PFLlib)."""
    logits = torch.zeros(2, 2, requires_grad=True)
    means = torch.tensor([[1.0, 2.0], [7.0, 7.0]], requires_grad=True)
    has = torch.tensor([True, False])
    loss = class_mse(logits, means, has, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert logits.grad is not None and logits.grad[1].tolist() == [0.0, 0.0]
    assert logits.grad[0].tolist() == pytest.approx([-0.5, -1.0])  # 2 (z - t) / 4
    assert means.grad is None  # the target is a constant


def test_soft_ce_distance_by_hand() -> None:
    """Target softmax(ln 3, 0) = (3/4, 1/4), student log-softmax(0, ln 3) = (ln 1/4, ln 3/4):
    CE = 3/4 ln 4 + 1/4 ln 4/3; a row without a target adds 0 to the batch mean."""
    logits = torch.tensor([[0.0, math.log(3)], [5.0, -5.0]], requires_grad=True)
    means = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    expected = 0.75 * math.log(4) + 0.25 * math.log(4 / 3)  # 1.111642
    one = class_soft_ce(logits[:1], means, torch.tensor([True, False]), torch.tensor([0]))
    assert one.item() == pytest.approx(expected)
    both = class_soft_ce(logits, means, torch.tensor([True, False]), torch.tensor([0, 1]))
    assert both.item() == pytest.approx(expected / 2)
    both.backward()
    assert logits.grad is not None and logits.grad[1].tolist() == [0.0, 0.0]
    # d/dz = (softmax(z) - target) / N
    assert logits.grad[0].tolist() == pytest.approx([(0.25 - 0.75) / 2, (0.75 - 0.25) / 2])


def test_bad_params_name_the_key() -> None:
    cls = get_strategy("fd")
    with pytest.raises(ScenarioError, match="strategy.params.beta"):
        cls(beta=-0.5)
    with pytest.raises(ScenarioError, match="strategy.params.distance"):
        cls(distance="kl")
    with pytest.raises(ScenarioError, match="strategy.params.class_weights"):
        cls(class_weights="size")
    assert cls().beta == 1.0 and cls().distance == "ce" and cls().class_weights == "uniform"


def test_record_bytes() -> None:
    record = class_record(np.zeros((10, 10)), np.zeros(10), "logits")
    assert array_bytes(record) == LOGITS_BYTES == 736
    assert record["logits"].numpy().dtype == np.float32
    assert record["counts"].numpy().dtype == np.int64


def test_global_logits_survive_a_checkpoint(tmp_path: Path) -> None:
    fd = get_strategy("fd")(beta=0.5)
    fd.global_means, fd.global_counts = aggregate_class_means(
        np.arange(8, dtype=np.float32).reshape(1, 2, 4), np.array([[3, 0]]))
    torch.save(strategy_state(fd), tmp_path / "s.pt")
    fresh = get_strategy("fd")(beta=0.5)
    load_strategy_state(fresh, torch.load(tmp_path / "s.pt", weights_only=True))
    assert np.array_equal(fresh.global_means, fd.global_means)
    assert fresh.global_counts.tolist() == [3, 0]


# ----------------------------------------------------------------------------- client side
@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


def client_env(world: World, store: Path, cid: int, extra: dict) -> ClientEnv:
    cfg = {**dict(train_config_record(world.scenario.clients.train, 0)), "server-round": 2,
           "epochs": 1, **extra}
    return ClientEnv(cid=cid, world=world, store=StateStore(store), config=ConfigRecord(cfg))


def private_state(env: ClientEnv) -> dict[str, np.ndarray]:
    model, existed = env.private_model()
    assert existed
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def fd_message(env: ClientEnv, global_logits: np.ndarray | None) -> Message:
    content = RecordDict({"config": env.config})
    if global_logits is not None:
        content["logits"] = class_record(global_logits, np.ones(len(global_logits)), "logits")
    return Message(content, dst_node_id=1, message_type=TRAIN_TYPE)


def test_beta_zero_is_training_alone_and_beta_changes_it(world: World, tmp_path: Path) -> None:
    c = world.data.num_classes
    target = np.eye(c, dtype=np.float32) * 5.0
    alone = client_env(world, tmp_path / "a", 2, {})
    train_local(Message(RecordDict({"config": alone.config}), dst_node_id=1,
                        message_type="train.local"), alone)
    off = client_env(world, tmp_path / "b", 2, {"fd-beta": 0.0, "fd-distance": "ce"})
    reply = train_fd(fd_message(off, target), off)
    on = client_env(world, tmp_path / "c", 2, {"fd-beta": 1.0, "fd-distance": "ce"})
    train_fd(fd_message(on, target), on)
    a, b, d = private_state(alone), private_state(off), private_state(on)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.allclose(a[k], d[k]) for k in a)
    # the upload: per-class means of the training logits, samples per class as counts
    up = reply["logits"]
    assert up["logits"].numpy().shape == (c, c)
    assert up["counts"].numpy().tolist() == world.counts[2].tolist()
    assert reply["metrics"]["distill-loss"] > 0  # measured even when β = 0


# ----------------------------------------------------------------------------- end to end
def run_fd(tmp_path: Path, overrides: Sequence[str]) -> list[RoundResult]:
    """The scenario's rounds on the inline engine (byte accounting included)."""
    return run_in_process(build_world(load_scenario(QUICKSTART, [*SMALL, *overrides])), tmp_path)


def test_beta_zero_run_equals_local_and_logits_cross_the_network(tmp_path: Path) -> None:
    local = run_fd(tmp_path / "local", ["strategy.name=local"])
    off = run_fd(tmp_path / "off", ["strategy.name=fd", "strategy.params.beta=0"])
    fd = run_fd(tmp_path / "fd", ["strategy.name=fd"])
    assert [r.eval_metrics["acc"] for r in off] == [r.eval_metrics["acc"] for r in local]
    assert fd[1].eval_metrics["acc"] != local[1].eval_metrics["acc"]
    assert all(t.down == t.up == 0 for t in local[0].traffic.values())
    assert [t.down for t in fd[0].traffic.values()] == [0] * 4  # round 1: nothing to send
    for r in fd:
        assert [t.up for t in r.traffic.values()] == [LOGITS_BYTES] * 4
    assert [t.down for t in fd[1].traffic.values()] == [LOGITS_BYTES] * 4
    assert fd[1].train_metrics["global-classes"] == 10


@pytest.mark.slow  # the contract test runs every strategy in process
def test_cli_heterogeneous_models_upload_one_logits_record(tmp_path: Path) -> None:
    """cnn_small and mlp clients: the same C x C upload, whatever the architecture."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART), "--out", str(tmp_path),
         "--no-progress", "--set", "strategy.name=fd", "--set", HETERO,
         *[a for s in SMALL for a in ("--set", s)]],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [(r["bytes_down"], r["bytes_up"]) for r in rows] == [
        (0, 4 * LOGITS_BYTES), (4 * LOGITS_BYTES, 4 * LOGITS_BYTES)]
    assert all(r["failures"] == 0 and 0.0 <= r["acc"] <= 1.0 for r in rows)
    clients = pq.read_table(run / "clients.parquet").to_pylist()
    assert {c["arch"] for c in clients} == {"cnn_small", "mlp"}
    assert {c["bytes_up"] for c in clients} == {LOGITS_BYTES}
