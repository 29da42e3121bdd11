"""Tests for strategies.feddf (FedDF: FedAvg per group + ensemble distillation on proxy data)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_runs import simulate_inline
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedkd.comm import arrayrecord_to_state_dict, split_groups, state_dict_to_arrayrecord
from fedkd.compose import load_scenario
from fedkd.data.base import TensorSplit
from fedkd.distill import kd_kl
from fedkd.ensemble import Teacher, TeacherEnsemble
from fedkd.errors import ScenarioError
from fedkd.train import evaluate, train_supervised
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.fedavg import NodeInfo, weighted_average
from strategies.feddf import FedDF, distill_loss, ensemble_targets

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
HETERO = "clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.5}]"


# ----------------------------------------------------------------------------- KD loss


def test_kd_kl_is_forward_kl_teacher_to_student() -> None:
    teacher = torch.log(torch.tensor([[0.97, 0.01, 0.01, 0.01]]))
    student = torch.zeros(1, 4)  # uniform
    p = [0.97, 0.01, 0.01, 0.01]
    forward = sum(pi * math.log(pi / 0.25) for pi in p)  # KL(teacher || student)
    reverse = sum(0.25 * math.log(0.25 / pi) for pi in p)  # KL(student || teacher)
    loss = kd_kl(student, teacher, 1.0).item()
    assert loss == pytest.approx(forward, abs=1e-6)
    assert abs(loss - reverse) > 0.5  # 1.2185 vs 2.0750
    # a one-hot teacher (as probabilities) vs a uniform student: KL = log C
    onehot = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert distill_loss("probs", 1.0)(student, onehot).item() == pytest.approx(math.log(4))


def test_kd_kl_temperature_scaling_and_batchmean() -> None:
    teacher = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.0, 4.0]])

    def kl(t: list[float], s: list[float]) -> float:
        pt = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
        ps = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
        return sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))

    # T=2: T^2 * mean over the batch of KL(softmax(t/2) || softmax(s/2))
    expected = 4.0 * (kl([1.0, 0.0], [0.0, 0.0]) + kl([0.0, 0.0], [0.0, 2.0])) / 2
    assert kd_kl(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    assert distill_loss("logits", 2.0)(student, teacher).item() == pytest.approx(expected,
                                                                                rel=1e-6)


def test_kd_kl_teacher_detached() -> None:
    teacher = torch.tensor([[1.0, -1.0, 0.5]], requires_grad=True)
    student = torch.zeros(1, 3, requires_grad=True)
    for loss_fn, target in ((distill_loss("logits", 1.0), teacher),
                            (distill_loss("probs", 1.0), torch.softmax(teacher, 1))):
        student.grad = None
        loss_fn(student, target).backward()
        assert teacher.grad is None
        assert student.grad is not None and student.grad.abs().sum() > 0
    # the gradient is softmax(student) - softmax(teacher), per sample (batchmean, T=1)
    student.grad = None
    kd_kl(student, teacher, 1.0).backward()
    expected = torch.softmax(student.detach(), 1) - torch.softmax(teacher.detach(), 1)
    torch.testing.assert_close(student.grad, expected)


# ----------------------------------------------------------------------------- ensemble


def test_ensemble_logits_vs_probs_exact() -> None:
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])  # K=2 teachers, N=1, C=2
    w = torch.full((1, 2), 0.5)
    torch.testing.assert_close(ensemble_targets(logits, w, "logits"), torch.tensor([[1.0, 0.0]]))
    e2 = math.exp(2.0)
    p = torch.tensor([[(e2 / (e2 + 1) + 0.5) / 2, (1 / (e2 + 1) + 0.5) / 2]])  # 0.6904, 0.3096
    torch.testing.assert_close(ensemble_targets(logits, w, "probs"), p)
    # averaging probabilities is not softmax of averaged logits (0.7311 for the first class)
    assert abs(torch.softmax(torch.tensor([1.0, 0.0]), 0)[0].item() - p[0, 0].item()) > 0.04
    # probs are softened at T: softmax([1, 0]) and [0.5, 0.5]
    e1 = math.exp(1.0)
    torch.testing.assert_close(ensemble_targets(logits, w, "probs", temperature=2.0),
                               torch.tensor([[(e1 / (e1 + 1) + 0.5) / 2,
                                              (1 / (e1 + 1) + 0.5) / 2]]))


def test_ensemble_per_sample_weights() -> None:
    logits = torch.tensor([[[4.0, 0.0], [1.0, 1.0]], [[0.0, 8.0], [3.0, -1.0]]])  # K=2, N=2
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    torch.testing.assert_close(ensemble_targets(logits, w, "logits"),
                               torch.tensor([[1.0, 6.0], [1.0, 1.0]]))
    probs = ensemble_targets(logits, w, "probs")
    torch.testing.assert_close(probs[1], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_distill_uses_clipped_adam_and_cosine_annealing(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: the server distils with Adam (lr ``distill_lr``), cosine annealing over
    ``distill_steps`` and gradient clipping at ``max_grad_norm``."""
    import strategies.feddf as feddf

    made: dict[str, object] = {}

    class SpyAdam(feddf.ClippedAdam):
        def __init__(self, params, lr, max_norm):  # type: ignore[no-untyped-def]
            made["adam"] = (lr, max_norm)
            super().__init__(params, lr=lr, max_norm=max_norm)

    class SpyCosine(torch.optim.lr_scheduler.CosineAnnealingLR):
        def __init__(self, optimizer, T_max):  # type: ignore[no-untyped-def]  # noqa: N803
            made["cosine"] = T_max
            super().__init__(optimizer, T_max=T_max)

    monkeypatch.setattr(feddf, "ClippedAdam", SpyAdam)
    monkeypatch.setattr(torch.optim.lr_scheduler, "CosineAnnealingLR", SpyCosine)
    student = torch.nn.Linear(4, 3)
    x = torch.randn(32, 4)
    result = feddf.distill(student, x, torch.randn(32, 3), distill_loss("logits", 1.0),
                           steps=7, batch_size=8, lr=3e-3, seed=0, val=None,
                           eval_interval=5, patience=0, max_grad_norm=5.0)
    assert made == {"adam": (3e-3, 5.0), "cosine": 7} and result.steps == 7


def test_bad_params_name_the_key() -> None:
    with pytest.raises(ScenarioError, match="strategy.params.ensemble"):
        FedDF(ensemble="avg_losses")
    with pytest.raises(ScenarioError, match="strategy.params.temperature"):
        FedDF(temperature=0.0)
    with pytest.raises(ScenarioError, match="strategy.params.eval_interval"):
        FedDF(eval_interval=0)
    with pytest.raises(ScenarioError, match="strategy.params.keep_best"):
        FedDF(keep_best="yes")  # type: ignore[arg-type]
    assert get_strategy("feddf") is FedDF


# ----------------------------------------------------------------------------- server side


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world() -> World:
    """Digits, 10 clients, half cnn_small and half mlp."""
    return build_world(load_scenario(QUICKSTART, [HETERO]))


def _instruction(node_id: int) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=node_id, message_type="train")


def _reply(node_id: int, state: dict[str, torch.Tensor], n: int) -> Message:
    return Message(RecordDict({"arrays": state_dict_to_arrayrecord(state),
                               "metrics": MetricRecord({"num-examples": n,
                                                        "train-loss": 1.0})}),
                   reply_to=_instruction(node_id))


def _setup(world: World, trained: bool, clients: int = 6,
           **params: object) -> tuple[FedDF, list[Message]]:
    """A bound FedDF with handshake info and one reply per client (trained or random)."""
    strategy = FedDF(seed=3, **params)  # type: ignore[arg-type]
    strategy.bind(world)
    strategy.nodes = [NodeInfo(100 + cid, cid, world.archs[cid], len(world.parts[cid]),
                               tuple(int(c) for c in world.counts[cid]))
                      for cid in range(world.num_clients)]
    strategy.current = split_groups(strategy.initial_arrays(world))
    cfg = dataclasses.replace(world.scenario.clients.train, epochs=10)
    replies = []
    for cid in range(clients):
        arch = world.archs[cid]
        model = world.new_model(arch, seed=cid + 1)
        if trained:
            model.load_state_dict(arrayrecord_to_state_dict(strategy.current[arch]))
            data = world.client_data(cid)
            train_supervised(model, data.x, data.y, cfg, seed=cid)
        replies.append(_reply(100 + cid, model.state_dict(), len(world.parts[cid])))
    return strategy, replies


def _val_acc(world: World, arch: str, rec: ArrayRecord) -> float:
    model = world.model_space().build(arch, arrayrecord_to_state_dict(rec))
    assert world.data.val is not None
    return evaluate(model, world.data.val.x, world.data.val.y)[1]


def test_zero_steps_is_fedavg_per_group_exact(world: World) -> None:
    strategy, replies = _setup(world, trained=False, distill_steps=0)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    out = split_groups(arrays)
    assert sorted(out) == ["cnn_small", "mlp"]
    for arch in out:
        mine = [r for r in replies if strategy.node(r.metadata.src_node_id).arch == arch]
        expected = weighted_average([r.content.array_records["arrays"] for r in mine],
                                    [len(world.parts[strategy.node(r.metadata.src_node_id).cid])
                                     for r in mine])
        assert list(out[arch]) == list(expected)
        for key in expected:
            np.testing.assert_array_equal(out[arch][key].numpy(), expected[key].numpy())
        assert metrics[f"val-acc-avg/{arch}"] == _val_acc(world, arch, expected)
    assert metrics["distill-steps"] == 0
    assert metrics["val-acc-distilled"] == metrics["val-acc-avg"]
    # every client model is a teacher, weighted uniformly
    assert [(r["client"], r["weight"]) for r in strategy.teacher_log.teacher_weights(1)] == [
        (c, pytest.approx(1 / 6)) for c in range(6)]


def test_distillation_keeps_or_improves_val_acc(world: World) -> None:
    strategy, replies = _setup(world, trained=True, distill_steps=100, eval_interval=10,
                               keep_best=True)
    arrays, metrics = strategy.aggregate_train(2, replies)
    assert arrays is not None and metrics is not None
    out = split_groups(arrays)
    for arch in ("cnn_small", "mlp"):
        before, after = metrics[f"val-acc-avg/{arch}"], metrics[f"val-acc-distilled/{arch}"]
        assert after >= before
        assert after == _val_acc(world, arch, out[arch])  # the kept student is the best one
        assert 0 < metrics[f"distill-steps/{arch}"] <= 100
    # the teachers' ensemble beats the average of non-IID models: distillation helps here
    assert metrics["val-acc-distilled"] > metrics["val-acc-avg"] + 0.1
    assert metrics["train-loss"] == 1.0
    assert strategy.distill_log[2] == {k: v for k, v in metrics.items() if k != "train-loss"}
    # deterministic: the same inputs give identical students
    again, _ = _setup(world, trained=True, distill_steps=100, eval_interval=10,
                      keep_best=True)[0].aggregate_train(2, replies)
    assert again is not None
    for key in arrays:
        np.testing.assert_array_equal(arrays[key].numpy(), again[key].numpy())


def _harmful(world: World, keep_best: bool) -> tuple[FedDF, list[Message]]:
    """Clients trained on the whole pool make a good FedAvg init; lr=5 wrecks every student."""
    strategy, _ = _setup(world, trained=False, distill_lr=5.0, max_grad_norm=0.0,
                         eval_interval=5, patience=2, distill_steps=40, keep_best=keep_best)
    cfg = dataclasses.replace(world.scenario.clients.train, epochs=3)
    replies = []
    for cid in range(4):
        model = world.new_model(world.archs[cid], seed=0)
        train_supervised(model, world.data.pool.x, world.data.pool.y, cfg, seed=cid)
        replies.append(_reply(100 + cid, model.state_dict(), 10 + cid))
    return strategy, replies


def test_keep_best_falls_back_to_fedavg_when_distillation_harms(world: World) -> None:
    strategy, replies = _harmful(world, keep_best=True)
    fedavg = strategy.aggregate_groups(replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["val-acc-avg/cnn_small"] > 0.8 and metrics["val-acc-avg/mlp"] > 0.8
    assert metrics["val-acc-distilled"] == metrics["val-acc-avg"]
    assert metrics["distill-fallback"] == 2  # both groups kept their FedAvg model
    # patience counts from the best *distilled* student, as the reference's tracker: 25 steps
    # (counted from the FedAvg model's accuracy it would stop after two evaluations, 10 steps)
    assert metrics["distill-steps/cnn_small"] == 25
    out = split_groups(arrays)
    for arch, rec in fedavg.items():
        for key in rec:
            np.testing.assert_array_equal(out[arch][key].numpy(), rec[key].numpy())


def test_default_keeps_best_distilled_student_as_reference(world: World) -> None:
    # the reference's return_best_model_on_val is false: the FedAvg model is no candidate
    assert FedDF().keep_best is False
    strategy, replies = _harmful(world, keep_best=False)
    fedavg = strategy.aggregate_groups(replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["distill-fallback"] == 0
    assert metrics["distill-steps/cnn_small"] == 25  # same early stopping as keep_best
    out = split_groups(arrays)
    for arch in ("cnn_small", "mlp"):
        distilled = metrics[f"val-acc-distilled/{arch}"]
        assert distilled < metrics[f"val-acc-avg/{arch}"]  # worse than FedAvg, kept anyway
        assert distilled == _val_acc(world, arch, out[arch])
        assert any(not np.array_equal(out[arch][k].numpy(), fedavg[arch][k].numpy())
                   for k in fedavg[arch])


def test_bind_needs_public_and_val() -> None:
    no_public = build_world(load_scenario(QUICKSTART, ["data.public.fraction=0"]))
    with pytest.raises(ScenarioError) as err:
        FedDF().bind(no_public)
    assert err.value.path == "data.public.fraction"
    no_val = build_world(load_scenario(QUICKSTART, ["data.val_fraction=0"]))
    with pytest.raises(ScenarioError) as err:
        FedDF().bind(no_val)
    assert err.value.path == "data.val_fraction"
    # without early stopping the validation split is optional: the last student is kept
    strategy, replies = _setup(no_val, trained=False, clients=3, patience=0, distill_steps=7)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["distill-steps"] == 7 and math.isnan(metrics["val-acc-distilled"])


def _expected_validation_weights(world: World, strategy: FedDF, replies: list[Message],
                                 split: TensorSplit) -> list[float]:
    """FedDF's ``validation`` weighting by hand: accuracy on ``split``, chance dropped."""
    accs = []
    for r in replies:
        model = world.model_space().build(strategy.node(r.metadata.src_node_id).arch,
                                          arrayrecord_to_state_dict(r.content["arrays"]))
        acc = evaluate(model, split.x, split.y)[1]
        accs.append(acc if acc > 1 / world.data.num_classes else 0.0)
    return [a / sum(accs) for a in accs]


@pytest.mark.parametrize("weight_fraction", [0.1, 0.0])
def test_validation_weighting_fits_on_the_weight_split(weight_fraction: float) -> None:
    world = build_world(load_scenario(QUICKSTART, [HETERO,
                                                   f"data.weight_fraction={weight_fraction}"]))
    strategy, replies = _setup(world, trained=True, clients=4, weighting="validation",
                               distill_steps=0)
    assert world.data.val is not None
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None
    if weight_fraction:  # its own split, disjoint from the early-stopping one
        split = world.data.weight
        assert split is not None and (len(split), len(world.data.val)) == (144, 144)
        assert metrics["weighting-on-val"] == 0.0
    else:  # today's behaviour: the early-stopping split, recorded as such
        split = world.data.val
        assert world.data.weight is None and metrics["weighting-on-val"] == 1.0
    assert strategy._server().weighting_data is split
    expected = _expected_validation_weights(world, strategy, replies, split)
    got = [row["weight"] for row in strategy.teacher_log.teacher_weights(1)]
    assert got == pytest.approx(expected, rel=1e-6)
    assert len(set(np.round(got, 6))) > 1  # the teachers are told apart


def test_label_using_weighting_needs_labeled_server_data() -> None:
    bare = build_world(load_scenario(QUICKSTART, ["data.val_fraction=0"]))
    with pytest.raises(ScenarioError) as err:
        FedDF(weighting="learned", patience=0).bind(bare)
    assert err.value.path == "data.weight_fraction"
    FedDF(weighting="uniform", patience=0).bind(bare)  # no labels needed


# ----------------------------------------------------------------------------- Ray teachers


def test_teacher_logits_on_ray_actors_match_in_process(world: World) -> None:
    ray = pytest.importorskip("ray")
    space = world.model_space()
    teachers = [Teacher(cid=i, arch=arch, state=world.new_model(arch, seed=i).state_dict())
                for i, arch in enumerate(["cnn_small", "mlp", "cnn_small", "mlp", "mlp"])]
    assert world.data.public is not None
    x = world.data.public.x
    local = TeacherEnsemble(space, teachers, actors=0).logits(x)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = TeacherEnsemble(space, teachers, actors=2)
        assert len(remote._workers()) == 2
        torch.testing.assert_close(remote.logits(x), local, atol=1e-6, rtol=0)
    finally:
        if started:
            ray.shutdown()
            TeacherEnsemble.shutdown()


# ----------------------------------------------------------------------------- CLI


def _simulate(out: Path, *sets: str) -> Path:
    return simulate_inline(out, "strategy.name=feddf", "rounds=2", *sets)


def test_cli_feddf(tmp_path: Path) -> None:
    run = _simulate(tmp_path, "strategy.params.keep_best=true")
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)
    assert rows[-1]["acc"] > 0.2  # well above chance after two rounds
    # FedDF adds no traffic to FedAvg: one cnn_small model each way per client and round
    assert rows[0]["bytes_down"] == rows[0]["bytes_up"] and rows[0]["participants"] == 10
    teachers = [t for t in pq.read_table(run / "teachers.parquet").to_pylist()
                if t["client"] >= 0 and t["class"] == -1 and t["source"] == "proxy"]
    assert len(teachers) == 20
    assert all(t["weight"] == pytest.approx(0.1) for t in teachers)
    assert rows[-1]["distill_steps"] > 0
    assert rows[-1]["val_acc_distilled"] >= rows[-1]["val_acc_avg"]  # keep_best


@pytest.mark.slow  # the contract test runs every strategy in process
def test_cli_feddf_heterogeneous(tmp_path: Path) -> None:
    run = _simulate(tmp_path, HETERO)
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    for r in rows:
        assert {"acc", "acc/cnn_small", "acc/mlp"} <= set(r)
        assert r["acc"] == pytest.approx(0.5 * r["acc/cnn_small"] + 0.5 * r["acc/mlp"])
