"""Tests for strategies.fedftg (generator shapes, generator loss, class weights, server round)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedkd.comm import arrayrecord_to_state_dict, split_groups, state_dict_to_arrayrecord
from fedkd.compose import load_scenario
from fedkd.distill import kd_kl
from fedkd.world import World, cached_world
from strategies import get_strategy
from strategies.fedavg import NodeInfo
from strategies.fedftg import FedFTG, Generator, generator_loss, label_distribution
from strategies.weighting import class_weights

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
SMALL = {"rounds_inner": 1, "gen_steps": 2, "ft_steps": 2, "batch_size": 16, "gen_width": 8}


# ----------------------------------------------------------------------------- generator


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 7, 9)])
def test_generator_output_shape(shape: tuple[int, int, int]) -> None:
    gen = Generator(noise_dim=64, num_classes=10, input_shape=shape, width=8)
    x = gen(torch.randn(5, 64), torch.arange(5)).detach()
    assert x.shape == (5, *shape)
    # the output BatchNorm puts a fresh generator's images on the normalised data scale
    assert abs(float(x.mean())) < 1e-4
    assert float(x.std()) == pytest.approx(1.0, rel=0.05)


def test_generator_depends_on_label() -> None:
    gen = Generator(8, 3, (1, 8, 8), width=4)
    z = torch.randn(1, 8).repeat(4, 1)
    x = gen(z, torch.tensor([0, 1, 0, 2]))
    torch.testing.assert_close(x[0], x[2])
    assert not torch.allclose(x[0], x[1])


# ----------------------------------------------------------------------------- generator loss


def test_generator_loss_exact_terms() -> None:
    ens = torch.zeros(2, 2)  # p = (1/2, 1/2)
    y = torch.tensor([0, 1])
    ln3 = math.log(3.0)
    student = torch.tensor([[ln3, 0.0], [0.0, ln3]])  # q = (3/4, 1/4) and (1/4, 3/4)
    z = torch.tensor([[0.0], [1.0]])  # squared distance 1 between the two noises
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])  # L1 mean distance 2 between the outputs
    out = generator_loss(ens, y, [student], z, x, lambda_dis=2.0, lambda_div=3.0)
    ce = math.log(2.0)
    kl = 0.5 * math.log(4.0 / 3.0)  # KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2
    div = math.exp(-1.0)  # mean over the 4 ordered pairs of 1 * 2 (twice) = 1
    assert out.ce == pytest.approx(ce)
    assert out.dis == pytest.approx(kl)
    assert out.div == pytest.approx(div)
    assert float(out.total) == pytest.approx(ce - 2.0 * kl + 3.0 * div)


def test_generator_loss_averages_students_and_rewards_disagreement() -> None:
    ens = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    agree = ens.clone()
    other = torch.tensor([[-1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    z, x = torch.randn(2, 4), torch.randn(2, 1, 2, 2)
    same = generator_loss(ens, y, [agree], z, x)
    assert same.dis == pytest.approx(0.0, abs=1e-7)
    both = generator_loss(ens, y, [agree, other], z, x)
    assert both.dis == pytest.approx(float(kd_kl(other, ens)) / 2)
    # the disagreement is subtracted: hard samples (student != ensemble) lower the loss
    assert float(both.total) < float(same.total)
    # a gradient step of the generator side increases the student/ensemble disagreement
    s = other.clone().requires_grad_(True)
    generator_loss(ens, y, [s], z, x).total.backward()
    before = float(kd_kl(other, ens))
    after = float(kd_kl(other - 0.1 * s.grad, ens))
    assert after > before


def test_generator_loss_ce_is_on_ensemble() -> None:
    ens = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    y = torch.tensor([1, 0])
    out = generator_loss(ens, y, [ens.detach()], torch.zeros(2, 1), torch.zeros(2, 1),
                         lambda_dis=1.0, lambda_div=0.0)
    out.total.backward()
    expected = torch.nn.functional.cross_entropy(ens.detach(), y)
    assert float(out.total) == pytest.approx(float(expected))
    assert ens.grad is not None and float(ens.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- class weights


def test_class_weights_and_label_distribution_with_missing_class() -> None:
    counts = torch.tensor([[3.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    w = class_weights(counts)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25], [0.0, 1.0], [0.5, 0.5]],
                                               dtype=torch.float64))
    p = label_distribution(counts)
    torch.testing.assert_close(p, torch.tensor([4 / 6, 2 / 6, 0.0], dtype=torch.float64))
    # a class nobody holds is never drawn
    draws = torch.multinomial(p, 1000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert int((draws == 2).sum()) == 0


# ----------------------------------------------------------------------------- server round


@pytest.fixture(scope="module")
def world() -> World:
    return cached_world(load_scenario(QUICKSTART))


def _instruction(node_id: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=node_id, message_type="train")


def _setup(world: World, **params: object) -> tuple[FedFTG, list[Message]]:
    """A bound strategy with 4 handshaken clients whose uploads are differently seeded models."""
    strategy = FedFTG(seed=3, **params)  # type: ignore[arg-type]
    strategy.bind(world)
    strategy.current = split_groups(strategy.initial_arrays(world))
    cids = [0, 2, 5, 7]
    strategy.nodes = [NodeInfo(node_id=100 + c, cid=c, arch=world.archs[c],
                               num_examples=int(world.counts[c].sum()),
                               label_counts=tuple(int(v) for v in world.counts[c]))
                      for c in cids]
    replies = []
    for c in cids:
        model = world.new_model(world.archs[c], seed=50 + c)
        replies.append(Message(RecordDict({
            "arrays": state_dict_to_arrayrecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": int(world.counts[c].sum()),
                                     "train-loss": 1.0})}), reply_to=_instruction(100 + c)))
    return strategy, replies


def test_registered() -> None:
    assert get_strategy("fedftg") is FedFTG


def test_aggregate_train_finetunes_and_records(world: World) -> None:
    strategy, replies = _setup(world, **SMALL)
    fedavg = strategy.aggregate_groups(replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert set(metrics) >= {"train-loss", "gen-loss", "ft-loss"}
    assert math.isfinite(float(metrics["gen-loss"])) and float(metrics["ft-loss"]) >= 0
    # the student starts at FedAvg and is moved by the fine-tuning
    arch = world.archs[0]
    tuned = arrayrecord_to_state_dict(split_groups(arrays)[arch])
    avg = arrayrecord_to_state_dict(fedavg[arch])
    assert tuned.keys() == avg.keys()
    assert any(not torch.equal(tuned[k], avg[k]) for k in avg)
    # teacher weights: one row per teacher in reply order; they are n_k(y)/n(y) averaged
    rows = strategy.teacher_weights[1]
    assert [r["client"] for r in rows] == [0, 2, 5, 7]
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0)


def test_uniform_weighting_when_label_weighting_off(world: World) -> None:
    strategy, replies = _setup(world, label_weighting=False, **SMALL)
    strategy.aggregate_train(1, replies)
    assert [r["weight"] for r in strategy.teacher_weights[1]] == pytest.approx([0.25] * 4)


def test_generator_persists_and_rounds_are_deterministic(world: World) -> None:
    a, replies = _setup(world, **SMALL)
    b, _ = _setup(world, **SMALL)
    ra, ma = a.aggregate_train(1, replies)
    gen = a.generator
    g1 = {k: v.clone() for k, v in gen.state_dict().items()}
    ra2, _ = a.aggregate_train(2, replies)
    assert a.generator is gen
    assert any(not torch.equal(g1[k], v) for k, v in gen.state_dict().items())
    rb, mb = b.aggregate_train(1, replies)
    assert dict(ma) == dict(mb)
    for key in ra:
        np.testing.assert_array_equal(ra[key].numpy(), rb[key].numpy())
    assert any(not np.array_equal(ra[k].numpy(), ra2[k].numpy()) for k in ra)


def test_teachers_are_frozen_in_eval_mode(world: World) -> None:
    strategy, replies = _setup(world, **SMALL)
    rnd = strategy._setup_round(1, replies, strategy.aggregate_groups(replies))
    assert all(not t.training for t in rnd.teachers)
    assert all(not p.requires_grad for t in rnd.teachers for p in t.parameters())


# ----------------------------------------------------------------------------- CLI


def test_cli_two_rounds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART),
         "--set", "strategy.name=fedftg", "--set", "rounds=2",
         "--set", "strategy.params.rounds_inner=2", "--set", "strategy.params.gen_width=16",
         "--set", "server.threads=1", "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["acc"] <= 1.0 and r["failures"] == 0 for r in rows)
    # clients move weights only: FedAvg's traffic both ways
    assert all(r["bytes_down"] == r["bytes_up"] > 0 for r in rows)
    teachers = pq.read_table(run / "teachers.parquet").to_pylist()
    assert len(teachers) == 20
    assert sum(t["weight"] for t in teachers if t["round"] == 1) == pytest.approx(1.0)
