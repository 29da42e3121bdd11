"""Tests for strategies.fedftg (generator shapes, generator loss, class weights, server round)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_runs import simulate_inline
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedkd.comm import arrayrecord_to_state_dict, split_groups, state_dict_to_arrayrecord
from fedkd.compose import load_scenario
from fedkd.errors import ScenarioError
from fedkd.world import World, cached_world
from strategies import get_strategy
from strategies.fedavg import NodeInfo
from strategies.fedftg import MODE_DEFAULTS, FedFTG, label_distribution
from strategies.weighting import class_weights

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
SMALL = {"mode": "fedftg", "rounds_inner": 1, "gen_steps": 2, "ft_steps": 2, "batch_size": 16,
         "gen_width": 8}


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


def test_mode_defaults_and_explicit_params_win() -> None:
    dense = FedFTG(mode="dense")
    assert (dense.gen_steps, dense.ft_lr, dense.ft_optimizer, dense.temperature) == (
        30, 0.01, "sgd", 20.0)
    assert (dense.synthesis.adv_mask, dense.synthesis.div, dense.label_weighting) == (
        "disagree", 0.0, False)
    assert FedFTG().mode == "dense"  # the default: it kept up with FedAvg in README's study
    ftg = FedFTG(mode="fedftg")
    assert ftg.synthesis.adv_mask == "agree" and ftg.label_weighting and ftg.temperature == 1.0
    assert FedFTG(mode="dense", temperature=4.0, adv_mask="none").temperature == 4.0
    assert set(MODE_DEFAULTS["dense"]) == set(MODE_DEFAULTS["fedftg"])


@pytest.mark.parametrize(("params", "key"), [
    ({"mode": "gan"}, "strategy.params.mode"), ({"adv_mask": "x"}, "strategy.params.adv_mask"),
    ({"lambda_bn": -1.0}, "strategy.params.lambda_bn"), ({"ft_optimizer": "rmsprop"},
                                                         "strategy.params.ft_optimizer"),
    ({"pool_size": 0}, "strategy.params.pool_size"), ({"device": "tpu"}, "strategy.params.device")])
def test_bad_params_name_the_key(params: dict, key: str) -> None:
    with pytest.raises(ScenarioError, match=key):
        FedFTG(**params)


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
    rows = strategy.teacher_log.teacher_weights(1)
    assert [r["client"] for r in rows] == [0, 2, 5, 7]
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0)


def test_uniform_weighting_when_label_weighting_off(world: World) -> None:
    strategy, replies = _setup(world, label_weighting=False, **SMALL)
    strategy.aggregate_train(1, replies)
    rows = strategy.teacher_log.teacher_weights(1)
    assert [r["weight"] for r in rows] == pytest.approx([0.25] * 4)


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


@pytest.fixture(scope="module")
def bn_world() -> World:
    return cached_world(load_scenario(QUICKSTART, ["clients.models.0.arch=cnn_medium"]))


def test_bn_prior_is_active_with_batchnorm_teachers(world: World, bn_world: World) -> None:
    plain, plain_replies = _setup(world, **SMALL)
    _, m_plain = plain.aggregate_train(1, plain_replies)
    assert m_plain is not None and float(m_plain["gen-bn"]) == 0.0  # cnn_small has no BN
    strategy, replies = _setup(bn_world, **SMALL)
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None and float(metrics["gen-bn"]) > 0.0
    assert {"gen-ce", "gen-adv"} <= set(metrics)


def test_dense_mode_resets_generator_and_bounds_its_pool(bn_world: World) -> None:
    params = {**SMALL, "mode": "dense", "rounds_inner": 2, "pool_size": 3}
    a, replies = _setup(bn_world, **params)
    ra, ma = a.aggregate_train(1, replies)
    assert len(a.pool) == 2 and all(x.shape == (16, 1, 8, 8) for x, _ in a.pool)
    # generated images stay inside the data's value range
    test_x = bn_world.data.test.x
    assert all(float(x.min()) >= float(test_x.min()) - 1e-5
               and float(x.max()) <= float(test_x.max()) + 1e-5 for x, _ in a.pool)
    # labels are uniform and sorted within a batch, as DENSE draws them
    assert all(torch.equal(y, y.sort().values) for _, y in a.pool)
    a.aggregate_train(2, replies)
    assert len(a.pool) == 3  # oldest batch dropped
    # the generator is re-initialised every synthesis: round 1 again gives the same result
    b, _ = _setup(bn_world, **params)
    rb, mb = b.aggregate_train(1, replies)
    assert dict(ma) == dict(mb)
    for key in ra:
        np.testing.assert_array_equal(ra[key].numpy(), rb[key].numpy())
    assert [r["weight"] for r in a.teacher_log.teacher_weights(1)] == pytest.approx([0.25] * 4)


def test_rollback_keeps_fedavg_when_finetuning_hurts(world: World) -> None:
    # a huge SGD step destroys the student: the validation check keeps FedAvg's model
    params = {**SMALL, "ft_optimizer": "sgd", "ft_lr": 1e4, "rollback": True}
    strategy, replies = _setup(world, **params)
    fedavg = strategy.aggregate_groups(replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and float(metrics["rolled-back"]) == 1.0
    kept = split_groups(arrays)[world.archs[0]]
    for key in kept:
        np.testing.assert_array_equal(kept[key].numpy(), fedavg[world.archs[0]][key].numpy())
    # without rollback the fine-tuned model replaces FedAvg's
    plain, replies = _setup(world, **{**params, "rollback": False})
    arrays, metrics = plain.aggregate_train(1, replies)
    assert arrays is not None and "rolled-back" not in metrics


def test_label_using_weighting_fits_on_the_weighting_split(world: World) -> None:
    strategy, replies = _setup(world, **{**SMALL, "label_weighting": False,
                                         "weighting": "validation"})
    rnd = strategy._setup_round(1, replies, strategy.aggregate_groups(replies))
    split = world.data.val  # no data.weight_fraction: the validation split
    assert rnd.ctx.val_logits is not None and rnd.ctx.val_logits.shape == (
        4, len(split), world.data.num_classes)
    torch.testing.assert_close(rnd.ctx.val_labels, split.y)
    strategy.aggregate_train(1, replies)
    rows = strategy.teacher_log.teacher_weights(1)
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0)
    no_val = cached_world(load_scenario(QUICKSTART, ["data.val_fraction=0"]))
    with pytest.raises(ScenarioError, match="data.weight_fraction"):
        FedFTG(label_weighting=False, weighting="validation").bind(no_val)


def test_rollback_needs_a_validation_split() -> None:
    no_val = cached_world(load_scenario(QUICKSTART, ["data.val_fraction=0"]))
    with pytest.raises(ScenarioError, match="data.val_fraction"):
        FedFTG(rollback=True).bind(no_val)


# ----------------------------------------------------------------------------- CLI


def test_cli_two_rounds(tmp_path: Path) -> None:
    run = simulate_inline(tmp_path, "strategy.name=fedftg", "rounds=2",
                          "strategy.params.rounds_inner=2", "strategy.params.gen_width=16",
                          "server.threads=1")
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["acc"] <= 1.0 and r["failures"] == 0 for r in rows)
    # clients move weights only: FedAvg's traffic both ways
    assert all(r["bytes_down"] == r["bytes_up"] > 0 for r in rows)
    teachers = [t for t in pq.read_table(run / "teachers.parquet").to_pylist()
                if t["client"] >= 0 and t["class"] == -1]
    assert len(teachers) == 20
    assert sum(t["weight"] for t in teachers if t["round"] == 1) == pytest.approx(1.0)
