"""Deep mutual learning among peers: leave-one-out targets, mutual KL, server round, CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Message, RecordDict
from grids import CidGrid

from fedkd.client import ClientEnv, train_config_record
from fedkd.compose import load_scenario
from fedkd.distill import mutual_kl
from fedkd.errors import ScenarioError
from fedkd.state import StateStore
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.dml import (
    DML,
    QUERY_TYPE,
    TRAIN_TYPE,
    dml_logits,
    dml_train,
    leave_one_out,
    peer_kl,
    teacher_rows,
)
from strategies.fedavg import NodeInfo
from strategies.fedmd import logits_record, record_logits
from strategies.weighting import TeacherContext, make_weighting

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


# (K=3 peers, N=2 samples, C=2 classes)
TOY = torch.tensor([[[0.0, 3.0], [6.0, 0.0]],
                    [[3.0, 0.0], [0.0, 6.0]],
                    [[6.0, 6.0], [3.0, 3.0]]])
CTX = TeacherContext(num_examples=torch.tensor([1.0, 2.0, 3.0]), label_counts=torch.ones(3, 2))


def test_leave_one_out_uniform_exact() -> None:
    targets, mean_w = leave_one_out(TOY, make_weighting("uniform"), CTX, ensemble="logits")
    assert torch.equal(targets[0], torch.tensor([[4.5, 3.0], [1.5, 4.5]]))  # mean of peers 1, 2
    assert torch.equal(targets[1], torch.tensor([[3.0, 4.5], [4.5, 1.5]]))  # mean of peers 0, 2
    assert torch.equal(targets[2], torch.tensor([[1.5, 1.5], [3.0, 3.0]]))  # mean of peers 0, 1
    assert torch.equal(mean_w, torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5],
                                             [0.5, 0.5, 0.0]], dtype=torch.float64))


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_leave_one_out_mean_of_probabilities_exact() -> None:
    """Peer 0's target: mean of softmax(TOY[1]) and softmax(TOY[2]) row by row; e.g. row 0:
    softmax(3, 0) = (s(3), 1 - s(3)) and softmax(6, 6) = (1/2, 1/2), s the logistic."""
    targets, _ = leave_one_out(TOY, make_weighting("uniform"), CTX)  # "probs" by default
    want0 = torch.tensor([[(_sig(3) + 0.5) / 2, (1 - _sig(3) + 0.5) / 2],   # 0.7263, 0.2737
                          [(_sig(-6) + 0.5) / 2, (_sig(6) + 0.5) / 2]])     # 0.2512, 0.7488
    torch.testing.assert_close(targets[0], want0)
    # peer 2: rows (0, 3) and (3, 0) -> (1/2, 1/2); rows (6, 0) and (0, 6) -> (1/2, 1/2)
    torch.testing.assert_close(targets[2], torch.full((2, 2), 0.5))
    # the logits ensemble of the same peers is sharper: softmax(4.5, 3) = (s(1.5), 1 - s(1.5))
    (logit_t0, *_), _ = leave_one_out(TOY, make_weighting("uniform"), CTX, ensemble="logits")
    assert float(torch.softmax(logit_t0[0], 0)[0]) == pytest.approx(_sig(1.5))  # 0.8176
    assert float(targets[0][0, 0]) == pytest.approx(0.72628, abs=1e-5)
    # at T = 2 each peer is softened first: softmax((3, 0) / 2) = (s(1.5), 1 - s(1.5))
    soft, _ = leave_one_out(TOY, make_weighting("uniform"), CTX, temperature=2.0)
    assert float(soft[0][0, 0]) == pytest.approx((_sig(1.5) + 0.5) / 2)


def test_probs_and_logits_coincide_for_two_peers() -> None:
    ctx = TeacherContext(num_examples=torch.ones(2), label_counts=torch.ones(2, 2))
    probs, _ = leave_one_out(TOY[:2], make_weighting("uniform"), ctx)
    logits, _ = leave_one_out(TOY[:2], make_weighting("uniform"), ctx, ensemble="logits")
    for p, t in zip(probs, logits, strict=True):
        torch.testing.assert_close(p, torch.softmax(t, dim=1))


def test_peer_kl_probs_and_logits_targets() -> None:
    """KL((3/4, 1/4) ‖ (1/2, 1/2)) = 3/4 ln 3/2 + 1/4 ln 1/2 = 0.130812, whether the target
    comes as probabilities or as logits (ln 3, 0)."""
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    me = torch.zeros(1, 2, requires_grad=True)
    q = torch.tensor([[0.75, 0.25]], requires_grad=True)
    got = peer_kl(me, q, 1.0, "probs")
    assert float(got.detach()) == pytest.approx(kl, rel=1e-6)
    got.backward()
    assert q.grad is None  # the peers' target is detached
    assert float(peer_kl(me.detach(), torch.tensor([[math.log(3.0), 0.0]]), 1.0, "logits")) == (
        pytest.approx(kl, rel=1e-6))
    # on TOY, peer 0 with uniform logits: the two ensembles give different losses
    probs, _ = leave_one_out(TOY, make_weighting("uniform"), CTX)
    logits, _ = leave_one_out(TOY, make_weighting("uniform"), CTX, ensemble="logits")
    zero = torch.zeros(2, 2)
    p0 = probs[0]
    want = float((p0 * (p0 / 0.5).log()).sum(1).mean())  # 0.1085
    assert float(peer_kl(zero, probs[0], 1.0, "probs")) == pytest.approx(want, rel=1e-5)
    assert float(peer_kl(zero, logits[0], 1.0, "logits")) > 2 * want


def test_bad_peer_ensemble_names_the_key() -> None:
    with pytest.raises(ScenarioError) as err:
        DML(peer_ensemble="mean")
    assert err.value.path == "strategy.params.peer_ensemble"
    assert DML().peer_ensemble == "probs"


def by_size(logits: torch.Tensor, ctx: TeacherContext, labels: torch.Tensor | None,
            ) -> torch.Tensor:
    """A weighting by training-set size (to see which peers the plug is called over)."""
    w = ctx.num_examples / ctx.num_examples.sum()
    return w.unsqueeze(0).expand(logits.shape[1], -1)


def test_leave_one_out_weighting_sees_only_other_peers() -> None:
    targets, mean_w = leave_one_out(TOY, by_size, CTX, ensemble="logits")
    # peer 0: others are peers 1 (size 2) and 2 (size 3) -> weights 0.4, 0.6
    assert torch.allclose(targets[0], 0.4 * TOY[1] + 0.6 * TOY[2])
    # peer 2: peers 0 (size 1) and 1 (size 2) -> 1/3, 2/3
    assert torch.allclose(targets[2], TOY[0] / 3 + 2 * TOY[1] / 3)
    assert torch.allclose(mean_w[0], torch.tensor([0.0, 0.4, 0.6], dtype=torch.float64))
    assert torch.allclose(mean_w.sum(dim=1), torch.ones(3, dtype=torch.float64))


def test_leave_one_out_single_peer_has_no_target() -> None:
    targets, mean_w = leave_one_out(TOY[:1], make_weighting("uniform"), CTX)
    assert targets == [None] and mean_w.tolist() == [[0.0]]


def test_teacher_rows_mean_over_students() -> None:
    nodes = [NodeInfo(node_id=i, cid=10 + i, arch="mlp", num_examples=1, label_counts=(1,))
             for i in range(3)]
    _, mean_w = leave_one_out(TOY, by_size, CTX)
    rows = teacher_rows(nodes, mean_w)
    # teacher 2 weighs 0.6 in peer 0's target (vs size 2) and 0.75 in peer 1's (vs size 1)
    assert (rows[2]["client"], rows[2]["weight"]) == (12, pytest.approx((0.6 + 0.75) / 2))
    assert teacher_rows(nodes[:1], mean_w[:1, :1]) == []


def test_mutual_kl_direction_and_detach() -> None:
    self_logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]], requires_grad=True)
    peer = torch.tensor([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]], requires_grad=True)
    p_peer, p_self = F.softmax(peer, 1), F.softmax(self_logits, 1)
    forward_kl = (p_peer * (p_peer.log() - p_self.log())).sum(1).mean()  # KL(peer || self)
    reverse_kl = (p_self * (p_self.log() - p_peer.log())).sum(1).mean()
    loss = mutual_kl(self_logits, [peer])
    assert loss.item() == pytest.approx(forward_kl.item(), rel=1e-6)
    assert loss.item() != pytest.approx(reverse_kl.item(), rel=1e-3)
    loss.backward()
    assert peer.grad is None and self_logits.grad is not None
    # gradient of batchmean KL(peer || self) w.r.t. self logits = (p_self - p_peer) / N
    assert torch.allclose(self_logits.grad, (p_self - p_peer).detach() / 2, atol=1e-6)


def test_mutual_kl_temperature_scaled_by_t_squared() -> None:
    s, p = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    t = 2.0
    q_p, q_s = F.softmax(p / t, 1), F.softmax(s / t, 1)
    expected = t * t * (q_p * (q_p.log() - q_s.log())).sum()
    assert mutual_kl(s, [p], t).item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- server round


def fake_grid(strategy: DML) -> CidGrid:
    """Answers logits queries with peer ``cid``'s logits = TOY[cid]."""
    return CidGrid(strategy, lambda cid: RecordDict({"logits": logits_record(TOY[cid])}))


@pytest.mark.parametrize("ensemble", ["probs", "logits"])
def test_configure_train_sends_each_peer_its_leave_one_out_target(ensemble: str) -> None:
    strategy = get_strategy("dml")(seed=1, public_size=2, temperature=2.0,
                                   peer_ensemble=ensemble)
    assert isinstance(strategy, DML)
    strategy.nodes = [NodeInfo(node_id=50 + cid, cid=cid, arch="mlp", num_examples=cid + 1,
                               label_counts=(1, 1)) for cid in range(3)]
    grid = fake_grid(strategy)
    msgs = list(strategy.configure_train(3, None, ConfigRecord({"lr": 0.1}), grid))
    assert [m.metadata.message_type for m in grid.sent] == [QUERY_TYPE] * 3
    assert not grid.sent[0].content.array_records
    targets, _ = leave_one_out(TOY, make_weighting("uniform"), CTX, ensemble=ensemble,
                               temperature=2.0)
    for m, t in zip(msgs, targets, strict=True):
        assert m.metadata.message_type == TRAIN_TYPE
        assert torch.equal(record_logits(m.content.array_records["peers"]), t)
        assert m.content.config_records["config"]["temperature"] == 2.0
        assert m.content.config_records["config"]["peer-ensemble"] == ensemble
    rows = strategy.teacher_log.teacher_weights(3)
    assert [r["weight"] for r in rows] == [pytest.approx(0.5)] * 3


# ----------------------------------------------------------------------------- client handlers


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


def test_client_trains_with_kl_towards_peer_target(world: World, tmp_path: Path) -> None:
    cfg = dict(train_config_record(world.scenario.clients.train, seed=0))
    cfg.update({"server-round": 1, "subset-seed": 3, "subset-size": 40, "temperature": 1.0,
                "kl-weight": 1.0})
    env = ClientEnv(cid=1, world=world, store=StateStore(tmp_path / "state"),
                    config=ConfigRecord(cfg))
    reply = dml_logits(Message(RecordDict({"config": env.config}), dst_node_id=1,
                               message_type=QUERY_TYPE), env)
    logits = record_logits(reply.array_records["logits"])
    assert logits.shape == (40, world.data.num_classes)
    target = torch.zeros_like(logits)
    target[:, 0] = 5.0
    content = RecordDict({"config": env.config, "peers": logits_record(target)})
    out = dml_train(Message(content, dst_node_id=1, message_type=TRAIN_TYPE), env)
    metrics = out.metric_records["metrics"]
    assert metrics["kl-loss"] > 0 and metrics["train-loss"] > 0
    assert env.store.load(1, "model") is not None
    # alone (no peers record): cross-entropy only
    alone = dml_train(Message(RecordDict({"config": env.config}), dst_node_id=1,
                              message_type=TRAIN_TYPE), env)
    assert alone.metric_records["metrics"]["kl-loss"] == 0.0


# ----------------------------------------------------------------------------- CLI


def test_cli_dml_two_rounds(world: World, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", QUICKSTART, "--set", "strategy.name=dml",
         "--set", "engine.name=inline",
         "--set", "rounds=2", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    logits_bytes = min(500, len(world.data.public)) * world.data.num_classes * 4 + 128
    weights_bytes = sum(p.numel() * 4 for p in world.new_model("cnn_small", 0).parameters())
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0
        assert r["failures"] == 0 and r["participants"] == 10
        assert r["bytes_up"] == r["bytes_down"] == 10 * logits_bytes
        assert r["bytes_up"] < weights_bytes
    rows = pq.read_table(run / "teachers.parquet").to_pylist()
    teachers = [t for t in rows if t["client"] >= 0]
    assert len(teachers) == 20 and all(t["weight"] == pytest.approx(1 / 9) for t in teachers)
    # one ensemble row per round; the diagnostics land in metrics.parquet
    ensemble = [t for t in rows if t["client"] == -1]
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [t["acc"] for t in ensemble] == [m["teach_ens_acc"] for m in metrics]
    assert all(m["teach_eff_k"] == pytest.approx(9.0) for m in metrics)
