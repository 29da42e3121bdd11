"""FedMD (Li & Wang 2019): consensus, digest loss, server round logic, client handlers, CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedkd.client import ClientEnv, train_config_record
from fedkd.compose import load_scenario
from fedkd.distill import logit_mae
from fedkd.errors import ScenarioError
from fedkd.state import StateStore
from fedkd.train import predict
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.fedavg import NodeInfo
from strategies.fedmd import (
    DIGEST_TYPE,
    QUERY_TYPE,
    FedMD,
    consensus,
    fedmd_digest,
    fedmd_logits,
    logits_record,
    public_subset,
    record_logits,
    teacher_context,
)
from strategies.weighting import TeacherContext, make_weighting

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


def _ctx(k: int) -> TeacherContext:
    return TeacherContext(torch.ones(k), torch.ones(k, 3))


# ----------------------------------------------------------------------------- losses


TOY = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]],
                    [[3.0, 0.0, 1.0], [2.0, 4.0, 0.0]]])  # (K=2, N=2, C=3)


def test_consensus_uniform_is_plain_mean() -> None:
    target, w = consensus(TOY, make_weighting("uniform"), _ctx(2))
    assert torch.equal(target, torch.tensor([[2.0, 1.0, 2.0], [1.0, 2.0, 3.0]]))
    assert torch.equal(w, torch.full((2, 2), 0.5))


def test_consensus_per_sample_weights_exact() -> None:
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    target, w = consensus(TOY, lambda logits, ctx, labels: weights, _ctx(2))
    assert torch.equal(w, weights)
    assert torch.equal(target, torch.tensor([[2.5, 0.5, 1.5], [0.0, 0.0, 6.0]]))


def test_consensus_passes_labels_and_context_to_weighting() -> None:
    seen = {}

    def weigh(logits: torch.Tensor, ctx: TeacherContext,
              labels: torch.Tensor | None) -> torch.Tensor:
        seen.update(k=ctx.num_teachers, labels=labels)
        return torch.full((logits.shape[1], logits.shape[0]), 0.5)

    consensus(TOY, weigh, _ctx(2), torch.tensor([1, 2]))
    assert seen["k"] == 2 and torch.equal(seen["labels"], torch.tensor([1, 2]))


def test_logit_mae_exact_and_consensus_detached() -> None:
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    cons = torch.tensor([[0.0, 2.0], [5.0, 4.5]], requires_grad=True)
    loss = logit_mae(student, cons)
    assert loss.item() == pytest.approx((1 + 0 + 2 + 0.5) / 4)  # mean over samples AND classes
    loss.backward()
    assert cons.grad is None
    assert torch.equal(student.grad, torch.tensor([[0.25, 0.0], [-0.25, -0.25]]))


def test_public_subset_seeded_sorted_capped() -> None:
    a = public_subset(100, 10, seed=3)
    assert np.array_equal(a, public_subset(100, 10, seed=3))
    assert not np.array_equal(a, public_subset(100, 10, seed=4))
    assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert np.array_equal(public_subset(7, 500, seed=0), np.arange(7))


def test_logits_record_round_trip_bytes() -> None:
    logits = torch.randn(144, 10)
    rec = logits_record(logits)
    assert torch.equal(record_logits(rec), logits)
    assert sum(len(a.data) for a in rec.values()) == 144 * 10 * 4 + 128  # .npy header


# ----------------------------------------------------------------------------- server round


def _nodes(k: int) -> list[NodeInfo]:
    return [NodeInfo(node_id=100 + 3 * cid, cid=cid, arch="cnn_small", num_examples=10 * (cid + 1),
                     label_counts=(cid + 1, 1)) for cid in range(k)]


class FakeGrid:
    """Answers logits queries with client ``cid``'s logits = ``cid`` everywhere."""

    def __init__(self, strategy: FedMD, n: int, c: int) -> None:
        self.strategy, self.n, self.c = strategy, n, c
        self.sent: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for m in messages:
            self.sent.append(m)
            cid = self.strategy.node(m.metadata.dst_node_id).cid
            out.append(Message(RecordDict({"logits": logits_record(
                torch.full((self.n, self.c), float(cid)))}), reply_to=m))
        return out


def test_configure_train_queries_then_sends_consensus() -> None:
    strategy = get_strategy("fedmd")(seed=5, alignment_size=4)
    assert isinstance(strategy, FedMD)
    strategy.nodes = _nodes(3)
    grid = FakeGrid(strategy, n=4, c=2)
    msgs = list(strategy.configure_train(2, None, ConfigRecord({"lr": 0.1}), grid))
    assert [m.metadata.message_type for m in grid.sent] == [QUERY_TYPE] * 3
    assert not grid.sent[0].content.array_records  # only the subset seed travels down
    cfg = grid.sent[0].content.config_records["config"]
    assert cfg["subset-size"] == 4 and cfg["subset-seed"] == strategy.subset_seed(2)
    assert [m.metadata.message_type for m in msgs] == [DIGEST_TYPE] * 3
    assert [m.metadata.dst_node_id for m in msgs] == [100, 103, 106]
    target = record_logits(msgs[0].content.array_records["consensus"])
    assert torch.equal(target, torch.full((4, 2), 1.0))  # mean of 0, 1, 2
    assert strategy.teacher_weights[2] == [
        {"client": c, "class": -1, "weight": pytest.approx(1 / 3)} for c in range(3)]


def test_teacher_context_from_handshake() -> None:
    ctx = teacher_context(_nodes(2))
    assert torch.equal(ctx.num_examples, torch.tensor([10.0, 20.0], dtype=torch.float64))
    assert ctx.label_counts.tolist() == [[1.0, 1.0], [2.0, 1.0]]


def test_bind_requires_public_split() -> None:
    scn = load_scenario(QUICKSTART, ["data.public.fraction=0.0"])
    with pytest.raises(ScenarioError) as err:
        FedMD().bind(build_world(scn))
    assert err.value.path == "data.public.fraction"


def test_bad_params_are_scenario_errors() -> None:
    with pytest.raises(ScenarioError, match="alignment_size"):
        FedMD(alignment_size=0)


# ----------------------------------------------------------------------------- client handlers


def _env(world: World, tmp_path: Path, cid: int, **extra: float) -> ClientEnv:
    cfg = dict(train_config_record(world.scenario.clients.train, seed=0))
    cfg.update({"server-round": 1, "subset-seed": 9, "subset-size": 50, "pretrain-epochs": 1,
                "private-epochs": 1, "digest-epochs": 3, "digest-lr": 1e-3,
                "digest-batch-size": 32, "revisit-epochs": 0, **extra})
    return ClientEnv(cid=cid, world=world, store=StateStore(tmp_path / "state"),
                     config=ConfigRecord(cfg))


def _msg(kind: str, content: RecordDict) -> Message:
    return Message(content, dst_node_id=1, message_type=kind)


def test_client_logits_then_digest_moves_towards_consensus(world: World, tmp_path: Path) -> None:
    env = _env(world, tmp_path, cid=0)
    reply = fedmd_logits(_msg(QUERY_TYPE, RecordDict({"config": env.config})), env)
    logits = record_logits(reply.array_records["logits"])
    assert logits.shape == (50, world.data.num_classes)
    assert env.store.load(0, "model") is not None  # transfer learning happened and was saved
    idx = public_subset(len(world.data.public), 50, 9)
    target = torch.zeros_like(logits)
    before = logit_mae(logits, target).item()
    out = fedmd_digest(_msg(DIGEST_TYPE, RecordDict({"config": env.config,
                                                     "consensus": logits_record(target)})), env)
    model, existed = env.private_model()
    assert existed
    after = logit_mae(predict(model, world.data.public.x[idx]), target).item()
    assert after < before
    assert out.metric_records["metrics"]["num-examples"] == len(env.data)


# ----------------------------------------------------------------------------- CLI


HETERO = "clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.5}]"


def test_cli_fedmd_heterogeneous_two_rounds(world: World, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", QUICKSTART, "--set", "strategy.name=fedmd",
         "--set", "rounds=2", "--set", HETERO, "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    n_align = min(500, len(world.data.public))
    logits_bytes = n_align * world.data.num_classes * 4 + 128
    weights_bytes = sum(p.numel() * 4 for p in world.new_model("cnn_small", 0).parameters())
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0
        assert r["failures"] == 0 and r["participants"] == 10
        assert r["bytes_up"] == r["bytes_down"] == 10 * logits_bytes
        assert r["bytes_up"] < weights_bytes  # all ten uploads < ONE cnn_small's weights
    clients = pq.read_table(run / "clients.parquet").to_pylist()
    assert {c["arch"] for c in clients} == {"cnn_small", "mlp"}
    assert {c["bytes_up"] for c in clients} == {logits_bytes}
    teachers = pq.read_table(run / "teachers.parquet").to_pylist()
    assert len(teachers) == 20 and all(t["weight"] == pytest.approx(0.1) for t in teachers)
    assert rows[1]["train_loss"] is not None
