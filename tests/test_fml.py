"""Tests for strategies.fml (mutual losses, joint step, meme-only traffic, private models)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedkd.client import ClientEnv, train_config_record
from fedkd.comm import split_groups
from fedkd.compose import from_dict
from fedkd.distill import kd_kl
from fedkd.errors import ScenarioError
from fedkd.scenario import load_raw
from fedkd.state import StateStore
from fedkd.train import fit, sgd
from fedkd.world import World, cached_world
from strategies import get_strategy
from strategies.fedavg import NodeInfo
from strategies.fml import (
    FML,
    REFERENCE_WEIGHT_DECAY,
    load_optimizer_state,
    mutual_kl_term,
    mutual_losses,
    mutual_optimizer,
    optimizer_state,
    train_fml,
)

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


# ----------------------------------------------------------------------------- losses

LN3 = math.log(3.0)
PRIVATE = torch.tensor([[LN3, 0.0]])  # q = (3/4, 1/4)
MEME = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
Y = torch.tensor([0])
CE_PRIVATE = math.log(4.0 / 3.0)
CE_MEME = math.log(2.0)
KL_MEME_PRIVATE = 0.5 * math.log(4.0 / 3.0)  # KL(p || q): target of the private model
KL_PRIVATE_MEME = 0.75 * math.log(1.5) - 0.25 * math.log(2.0)  # KL(q || p): meme's target


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.5), (0.3, 0.8), (1.0, 0.0)])
def test_mutual_losses_exact(alpha: float, beta: float) -> None:
    lp, lm = mutual_losses(PRIVATE, MEME, Y, alpha, beta)
    assert float(lp) == pytest.approx(alpha * CE_PRIVATE + (1 - alpha) * KL_MEME_PRIVATE)
    assert float(lm) == pytest.approx(beta * CE_MEME + (1 - beta) * KL_PRIVATE_MEME)


def test_mutual_losses_default_is_paper_half_half() -> None:
    lp, lm = mutual_losses(PRIVATE, MEME, Y)
    assert float(lp) == pytest.approx(0.5 * (CE_PRIVATE + KL_MEME_PRIVATE))
    assert float(lm) == pytest.approx(0.5 * (CE_MEME + KL_PRIVATE_MEME))


def test_mutual_losses_temperature_scales_kl_by_t_squared() -> None:
    t = 2.0
    lp, _ = mutual_losses(PRIVATE, MEME, Y, alpha=0.0, beta=0.0, temperature=t)
    q = F.softmax(PRIVATE / t, dim=1)
    expected = t * t * float((0.5 * (math.log(0.5) - q.log())).sum())
    assert float(lp) == pytest.approx(expected)


def test_mutual_losses_detach_the_peer() -> None:
    p = PRIVATE.clone().requires_grad_(True)
    m = MEME.clone().requires_grad_(True)
    lp, lm = mutual_losses(p, m, Y)
    (gp_from_lm,) = torch.autograd.grad(lm, p, allow_unused=True)
    (gm_from_lp,) = torch.autograd.grad(lp, m, allow_unused=True)
    assert gp_from_lm is None and gm_from_lp is None


def test_kl_reduction_batchmean_mean_sum() -> None:
    """Two samples, two classes: row 0 is KL((1/2, 1/2) ‖ (3/4, 1/4)) = ½ ln 4/3, row 1 is 0.
    batchmean divides the sum by N = 2 (the reference's), mean by N·C = 4, sum not at all."""
    private = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    meme = torch.zeros(2, 2)
    y = torch.tensor([0, 1])
    got = {r: float(mutual_losses(private, meme, y, alpha=0.0, reduction=r)[0])
           for r in ("batchmean", "mean", "sum")}
    assert got == pytest.approx({"batchmean": KL_MEME_PRIVATE / 2, "mean": KL_MEME_PRIVATE / 4,
                                 "sum": KL_MEME_PRIVATE})
    # batchmean is fedkd's kd_kl, so the default reproduces the earlier losses exactly
    assert torch.equal(mutual_kl_term(private, meme), kd_kl(private, meme))
    lp, lm = mutual_losses(private, meme, y, 0.3, 0.6, reduction="mean")
    assert float(lm) == pytest.approx(0.6 * CE_MEME + 0.4 * KL_PRIVATE_MEME / 4)
    assert float(lp) == pytest.approx(0.3 * float(F.cross_entropy(private, y))
                                      + 0.7 * KL_MEME_PRIVATE / 4)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reference_optimizers_equal_two_torch_optimizers(kind: str) -> None:
    """One optimizer with a group per model = the reference's two (``Node.init_optimizer``):
    SGD(lr, momentum, weight_decay=5e-4) or Adam(lr, weight_decay=1e-4), one per model."""
    torch.manual_seed(1)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    private, meme = nn.Linear(4, 3), nn.Linear(4, 3)
    p2, m2 = copy.deepcopy(private), copy.deepcopy(meme)
    cfg = from_dict({"clients": {"train": {"lr": 0.1, "momentum": 0.9,
                                           "weight_decay": 0.01}}}).clients.train
    batches = [torch.arange(0, 6), torch.arange(6, 12), torch.arange(0, 12)]

    def joint(idx: torch.Tensor) -> torch.Tensor:
        lp, lm = mutual_losses(private(x[idx]), meme(x[idx]), y[idx])
        return lp + lm

    fit(nn.ModuleList([private, meme]), mutual_optimizer(kind, private, meme, cfg),
        iter(batches), joint)

    def make(model: nn.Module) -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=1e-4)

    assert REFERENCE_WEIGHT_DECAY == {"sgd": 5e-4, "adam": 1e-4}
    opt_p, opt_m = make(p2), make(m2)
    for idx in batches:
        opt_p.zero_grad()
        opt_m.zero_grad()
        lp, lm = mutual_losses(p2(x[idx]), m2(x[idx]), y[idx])
        (lp + lm).backward()
        opt_p.step()
        opt_m.step()
    for a, b in zip([*private.parameters(), *meme.parameters()],
                    [*p2.parameters(), *m2.parameters()], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_private_optimizer_state_round_trip(kind: str) -> None:
    """Saving the private model's state and loading it into a fresh optimizer continues the
    run exactly as if the optimizer had been kept (the reference's persistent optimizer)."""
    torch.manual_seed(2)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    cfg = from_dict({}).clients.train
    private, meme = nn.Linear(4, 3), nn.Linear(4, 3)
    kept_p, kept_m = copy.deepcopy(private), copy.deepcopy(meme)

    def loss_of(p: nn.Module, m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda idx: sum(mutual_losses(p(x[idx]), m(x[idx]), y[idx]))

    kept = mutual_optimizer(kind, kept_p, kept_m, cfg)
    fit(nn.ModuleList([kept_p, kept_m]), kept, iter([torch.arange(8)] * 2),
        loss_of(kept_p, kept_m))  # two steps with one optimizer kept throughout
    first = mutual_optimizer(kind, private, meme, cfg)
    fit(nn.ModuleList([private, meme]), first, iter([torch.arange(8)]), loss_of(private, meme))
    saved = optimizer_state(first, list(private.parameters()))
    after_p, after_m = copy.deepcopy(private), copy.deepcopy(meme)
    assert sorted(saved) == sorted(f"{i}.{n}" for i in range(2) for n in (
        ["momentum_buffer"] if kind == "sgd" else ["exp_avg", "exp_avg_sq", "step"]))
    # round 2: a fresh optimizer with the private state restored (the meme's starts afresh,
    # which cannot reach the private model's update: its KL target is detached)
    second = mutual_optimizer(kind, private, meme, cfg)
    load_optimizer_state(second, list(private.parameters()), saved)
    fit(nn.ModuleList([private, meme]), second, iter([torch.arange(8)]), loss_of(private, meme))
    for a, b in zip(private.parameters(), kept_p.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # without the saved state the private update differs (momentum / moments restart)
    restart = mutual_optimizer(kind, after_p, after_m, cfg)
    fit(nn.ModuleList([after_p, after_m]), restart, iter([torch.arange(8)]),
        loss_of(after_p, after_m))
    assert not torch.allclose(after_p.weight, kept_p.weight)


def test_one_optimizer_over_both_equals_two_optimizers() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    private, meme = nn.Linear(4, 3), nn.Linear(4, 3)
    p2, m2 = copy.deepcopy(private), copy.deepcopy(meme)
    cfg = from_dict({}).clients.train
    batches = [torch.arange(0, 6), torch.arange(6, 12)]

    def joint(idx: torch.Tensor) -> torch.Tensor:
        lp, lm = mutual_losses(private(x[idx]), meme(x[idx]), y[idx])
        return lp + lm

    pair = nn.ModuleList([private, meme])
    fit(pair, sgd(pair, cfg), iter(batches), joint)
    opt_p, opt_m = sgd(p2, cfg), sgd(m2, cfg)
    for idx in batches:
        opt_p.zero_grad()
        opt_m.zero_grad()
        lp, lm = mutual_losses(p2(x[idx]), m2(x[idx]), y[idx])
        lp.backward()
        lm.backward()
        opt_p.step()
        opt_m.step()
    for a, b in zip([*private.parameters(), *meme.parameters()],
                    [*p2.parameters(), *m2.parameters()], strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- strategy


@pytest.fixture(scope="module")
def world() -> World:
    return cached_world(from_dict(load_raw(QUICKSTART)))


@pytest.fixture(scope="module")
def hetero_world() -> World:
    raw = load_raw(QUICKSTART)
    raw["clients"]["models"] = [{"arch": "cnn_small", "fraction": 0.5},
                                {"arch": "mlp", "fraction": 0.5}]
    return cached_world(from_dict(raw))


def test_registered() -> None:
    assert get_strategy("fml") is FML


def test_meme_arch_defaults_to_first_group_and_is_checked(hetero_world: World) -> None:
    s = FML()
    s.bind(hetero_world)
    assert s.meme_arch == "cnn_small"
    arrays = s.initial_arrays(hetero_world)
    assert list(split_groups(arrays)) == ["cnn_small"]
    s2 = FML(meme_arch="mlp")
    s2.bind(hetero_world)
    assert list(split_groups(s2.initial_arrays(hetero_world))) == ["mlp"]
    with pytest.raises(ScenarioError, match="meme_arch"):
        FML(meme_arch="resnet8").bind(hetero_world)
    with pytest.raises(ScenarioError, match="alpha"):
        FML(alpha=1.5)
    for key, value in (("optimizer", "rmsprop"), ("kl_reduction", "none")):
        with pytest.raises(ScenarioError) as err:
            FML(**{key: value})
        assert err.value.path == f"strategy.params.{key}"


def _rec(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2,), value, dtype=np.float32)),
                        "n": Array(np.array([3], dtype=np.int64))})


def _reply(node_id: int, value: float, n: int) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=node_id, message_type="train.fml")
    return Message(RecordDict({"arrays": _rec(value),
                               "metrics": MetricRecord({"num-examples": n, "train-loss": value})}),
                   reply_to=instruction)


def test_messages_carry_the_meme_and_aggregation_ignores_private_archs(
        hetero_world: World) -> None:
    s = FML(alpha=0.3, beta=0.7)
    s.bind(hetero_world)
    s.nodes = [NodeInfo(10 + c, c, hetero_world.archs[c], 5, (1, 2)) for c in range(4)]
    s.current = {"cnn_small": _rec(0.0)}
    msgs = s.train_messages(4, s.nodes, ConfigRecord({"lr": 0.1}))
    assert [m.metadata.message_type for m in msgs] == ["train.fml"] * 4
    for m in msgs:  # every client gets the same meme, whatever its private architecture
        assert m.content.array_records["arrays"] is s.current["cnn_small"]
        cfg = m.content.config_records["config"]
        assert (cfg["meme-arch"], cfg["alpha"], cfg["beta"], cfg["server-round"]) == (
            "cnn_small", 0.3, 0.7, 4)
        assert (cfg["optimizer"], cfg["kl-reduction"]) == ("joint", "batchmean")
    arrays, metrics = s.aggregate_train(4, [_reply(10, 1.0, 1), _reply(11, 5.0, 3)])
    assert arrays is not None and list(arrays) == ["cnn_small.w", "cnn_small.n"]
    np.testing.assert_array_equal(arrays["cnn_small.w"].numpy(), [4.0, 4.0])
    assert metrics is not None and float(metrics["train-loss"]) == pytest.approx(4.0)


def test_aggregate_evaluate_does_not_clash_with_central_acc() -> None:
    s = FML()
    replies = []
    for nid, acc in ((1, 0.5), (2, 0.7)):
        instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=nid,
                              message_type="evaluate.private")
        replies.append(Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": 10, "eval-acc": acc, "eval-loss": 1.0 + acc})}),
            reply_to=instruction))
    out = s.aggregate_evaluate(1, replies)
    assert out is not None and "acc" not in out and "loss" not in out
    assert float(out["acc-private"]) == pytest.approx(0.6)
    assert float(out["acc-private-min"]) == pytest.approx(0.5)
    assert float(out["loss-private"]) == pytest.approx(1.6)


# ----------------------------------------------------------------------------- client


def test_client_trains_both_and_keeps_the_private_model(hetero_world: World,
                                                        tmp_path: Path) -> None:
    s = FML()
    s.bind(hetero_world)
    meme_arrays = split_groups(s.initial_arrays(hetero_world))["cnn_small"]
    cid = hetero_world.archs.index("mlp")  # a private mlp learning with a cnn_small meme
    scn = hetero_world.scenario
    config = ConfigRecord({**dict(train_config_record(scn.clients.train, scn.seed)),
                           "server-round": 1, "meme-arch": "cnn_small", "alpha": 0.5,
                           "beta": 0.5, "temperature": 1.0})
    env = ClientEnv(cid=cid, world=hetero_world, store=StateStore(tmp_path), config=config)
    msg = Message(RecordDict({"arrays": meme_arrays, "config": config}), dst_node_id=1,
                  message_type="train.fml")
    out = train_fml(msg, env)
    sent = out.array_records["arrays"]
    assert list(sent) == list(meme_arrays)  # the meme goes back, never the private model
    assert any(not np.array_equal(sent[k].numpy(), meme_arrays[k].numpy()) for k in sent)
    m = out.metric_records["metrics"]
    assert int(m["num-examples"]) == len(env.data)
    assert float(m["train-loss"]) > 0 and float(m["train-loss-private"]) > 0
    saved = StateStore(tmp_path).load(cid, "model")
    assert saved is not None and set(saved) == set(hetero_world.new_model("mlp", 0).state_dict())
    assert env.private_model()[1]
    # the same message on the same (fresh) private state gives the same meme: seeded batches
    env_b = ClientEnv(cid=cid, world=hetero_world, store=StateStore(tmp_path / "b"),
                      config=config)
    again = train_fml(msg, env_b).array_records["arrays"]
    for k in sent:
        np.testing.assert_array_equal(sent[k].numpy(), again[k].numpy())


def test_client_keeps_the_private_optimizer_state_with_reference_optimizers(
        hetero_world: World, tmp_path: Path) -> None:
    s = FML(optimizer="sgd")
    s.bind(hetero_world)
    meme_arrays = split_groups(s.initial_arrays(hetero_world))["cnn_small"]
    cid = hetero_world.archs.index("mlp")
    scn = hetero_world.scenario
    store = StateStore(tmp_path)
    for kind in ("joint", "sgd"):
        config = ConfigRecord({**dict(train_config_record(scn.clients.train, scn.seed)),
                               "server-round": 1, "meme-arch": "cnn_small",
                               "optimizer": kind, "kl-reduction": "sum"})
        env = ClientEnv(cid=cid, world=hetero_world, store=store, config=config)
        out = train_fml(Message(RecordDict({"arrays": meme_arrays, "config": config}),
                                dst_node_id=1, message_type="train.fml"), env)
        assert float(out.metric_records["metrics"]["train-loss"]) > 0
        saved = store.load(cid, "optimizer")
        if kind == "joint":
            assert saved is None  # joint: nothing persists but the private model
    private = list(hetero_world.new_model("mlp", 0).parameters())
    assert saved is not None and len(saved) == len(private)  # one momentum buffer each
    for i, p in enumerate(private):
        assert saved[f"{i}.momentum_buffer"].shape == p.shape


# ----------------------------------------------------------------------------- CLI


def test_cli_two_rounds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART),
         "--set", "strategy.name=fml", "--set", "rounds=2", "--out", str(tmp_path),
         "--set", "engine.name=inline",
         "--no-progress"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["failures"] == 0 and r["participants"] == 10
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc-private"] <= 1.0
        assert r["acc-private-min"] <= r["acc-private"]
        # only the meme travels, the same model both ways
        assert r["bytes_down"] == r["bytes_up"] > 0
        assert r["train_loss"] is not None
    assert rows[1]["acc"] > 0.2
