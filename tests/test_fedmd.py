"""FedMD (Li & Wang 2019): consensus, digest loss, the paper's schedule (transfer learning with
early stopping once per client, digest, revisit), server round logic, client handlers, CLI;
and the public pre-training of training alone (``local``), the paper's baseline."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from cli_runs import simulate_inline
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from grids import CidGrid
from torch import nn

from fedkd.client import ClientEnv, train_config_record
from fedkd.compose import load_scenario
from fedkd.distill import logit_mae
from fedkd.errors import ScenarioError
from fedkd.scenario import TrainConfig
from fedkd.state import StateStore
from fedkd.train import predict, train_supervised
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
    pretrain_summary,
    public_subset,
    record_logits,
    revisit,
    teacher_context,
)
from strategies.local import (
    PRIVATE_PRETRAIN,
    PUBLIC_PRETRAIN,
    EarlyStopping,
    Local,
    Pretrain,
    fit_early_stopping,
    holdout_split,
    stages_from,
    train_local,
    transfer_learning,
)
from strategies.weighting import TeacherContext, make_weighting

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


@pytest.fixture(scope="module")
def labeled() -> World:
    return build_world(load_scenario(QUICKSTART, ["data.public.labeled=true"]))


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


# ----------------------------------------------------------------------------- early stopping


def test_early_stopping_is_keras_semantics() -> None:
    """Improvement means ``acc - min_delta > best``; stop after ``patience`` stale epochs."""
    stopper = EarlyStopping(patience=2, min_delta=0.001)
    flags = [stopper.stop(a) for a in (0.5, 0.6, 0.6005, 0.59)]
    assert flags == [False, False, False, True]  # 0.6005 is within min_delta of 0.6: stale
    assert stopper.best == 0.6 and stopper.wait == 2
    again = EarlyStopping(patience=2, min_delta=0.001)
    assert [again.stop(a) for a in (0.5, 0.6, 0.6005, 0.61, 0.61, 0.61)] == [
        False, False, False, False, False, True]  # 0.61 resets the count


def test_holdout_split_seeded_disjoint_at_least_one() -> None:
    train, held = holdout_split(10, 0.2, seed=1)
    assert len(held) == 2 and len(train) == 8
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(10))
    assert np.array_equal(held, holdout_split(10, 0.2, seed=1)[1])
    assert len(holdout_split(10, 0.01, seed=0)[1]) == 1  # at least one sample monitored
    assert len(holdout_split(1, 0.5, seed=0)[1]) == 0  # never all of them
    assert len(holdout_split(10, 0.0, seed=0)[1]) == 0


def _separable() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[10.0], [-10.0]]).repeat(100, 1), torch.tensor([1, 0]).repeat(100)


def test_fit_early_stopping_stops_patience_epochs_after_the_best() -> None:
    """Separable toy data: held-out accuracy is 1.0 after epoch 1 and cannot improve, so
    training stops after epoch 1 + patience = 4 of at most 20."""
    x, y = _separable()
    torch.manual_seed(0)
    model = nn.Linear(1, 2)
    stage = Pretrain(epochs=20, batch_size=8, lr=0.1, patience=3, holdout_fraction=0.1)
    result = fit_early_stopping(model, x, y, stage, TrainConfig(), seed=0)
    assert (result.epochs, result.best_acc) == (4, 1.0)
    no_holdout = fit_early_stopping(nn.Linear(1, 2), x, y,
                                    Pretrain(epochs=3, batch_size=8, holdout_fraction=0.0),
                                    TrainConfig(), seed=0)
    assert no_holdout.epochs == 3 and math.isnan(no_holdout.best_acc)  # all epochs run


# ----------------------------------------------------------------------------- schedule


def test_defaults_are_the_reference_schedule() -> None:
    """conf/*.json and FedMD.py of diogenes0319/FedMD_clean: N_alignment 5000; public
    pre-training batch 128, <= 20 epochs, patience 3; private batch 32, <= 25 epochs,
    patience 10; digest batch 256 x 1 epoch; revisit batch 5 x 2 epochs; Adam 1e-3."""
    cfg = FedMD().round_config(1, ConfigRecord({"lr": 0.05}))
    expected = {"subset-size": 5000, "pretrain-public-epochs": 20,
                "pretrain-public-batch-size": 128, "pretrain-public-patience": 3,
                "pretrain-public-lr": 1e-3, "pretrain-private-epochs": 25,
                "pretrain-private-batch-size": 32, "pretrain-private-patience": 10,
                "pretrain-private-lr": 1e-3, "pretrain-private-min-delta": 0.001,
                "pretrain-private-holdout-fraction": 0.1, "digest-epochs": 1,
                "digest-batch-size": 256, "digest-lr": 1e-3, "revisit-epochs": 2,
                "revisit-batch-size": 5, "revisit-lr": 1e-3, "lr": 0.05}
    assert {k: cfg[k] for k in expected} == expected  # clients.train's lr travels untouched


def test_alignment_size_capped_at_the_public_split(world: World) -> None:
    strategy = FedMD()
    strategy.bind(world)
    n_pub = len(world.data.public)
    assert n_pub < 5000
    assert strategy.alignment_n == n_pub
    assert strategy.round_config(1, ConfigRecord())["subset-size"] == n_pub
    small = FedMD(alignment_size=50)
    small.bind(world)
    assert small.alignment_n == 50


@pytest.mark.parametrize(("params", "key"), [
    ({"alignment_size": 0}, "alignment_size"),
    ({"holdout_fraction": 1.0}, "holdout_fraction"),
    ({"revisit_batch_size": 0}, "revisit_batch_size"),
    ({"revisit_epochs": -1}, "revisit_epochs"),
    ({"lr": 0.0}, "lr"),
    ({"pretrain_private_epochs": -1}, "pretrain_private_epochs"),
    ({"pretrain_public_epochs": 1.5}, "pretrain_public_epochs"),
    ({"min_delta": -0.1}, "min_delta"),
    ({"digest_lr": 0.0}, "digest_lr"),
])
def test_bad_params_are_scenario_errors(params: dict[str, float], key: str) -> None:
    with pytest.raises(ScenarioError) as err:
        FedMD(**params)
    assert err.value.path == f"strategy.params.{key}"


@pytest.mark.parametrize("key", ["pretrain_public_epochs", "pretrain_private_epochs"])
def test_local_bad_pretrain_epochs_name_the_key(key: str) -> None:
    with pytest.raises(ScenarioError) as err:
        Local(**{key: -1})
    assert err.value.path == f"strategy.params.{key}"


# ----------------------------------------------------------------------------- server round


def _nodes(k: int) -> list[NodeInfo]:
    return [NodeInfo(node_id=100 + 3 * cid, cid=cid, arch="cnn_small", num_examples=10 * (cid + 1),
                     label_counts=(cid + 1, 1)) for cid in range(k)]


def fake_grid(strategy: FedMD, n: int, c: int) -> CidGrid:
    """Answers logits queries with client ``cid``'s logits = ``cid`` everywhere; client 0
    reports that it pre-trained (5 public, 12 private epochs, held-out accuracy 0.75)."""

    def reply(cid: int) -> RecordDict:
        report = ({"pretrained": 1, "pretrain-public-epochs": 5,
                   "pretrain-private-epochs": 12, "pretrain-private-val-acc": 0.75}
                  if cid == 0 else {"pretrained": 0, "pretrain-public-epochs": 0,
                                    "pretrain-private-epochs": 0,
                                    "pretrain-private-val-acc": 0.0})
        return RecordDict({"logits": logits_record(torch.full((n, c), float(cid))),
                           "metrics": MetricRecord(report)})

    return CidGrid(strategy, reply)


def test_configure_train_queries_then_sends_consensus() -> None:
    strategy = get_strategy("fedmd")(seed=5, alignment_size=4)
    assert isinstance(strategy, FedMD)
    strategy.nodes = _nodes(3)
    grid = fake_grid(strategy, n=4, c=2)
    msgs = list(strategy.configure_train(2, None, ConfigRecord({"lr": 0.1}), grid))
    assert [m.metadata.message_type for m in grid.sent] == [QUERY_TYPE] * 3
    assert not grid.sent[0].content.array_records  # only the subset seed travels down
    cfg = grid.sent[0].content.config_records["config"]
    assert cfg["subset-size"] == 4 and cfg["subset-seed"] == strategy.subset_seed(2)
    assert [m.metadata.message_type for m in msgs] == [DIGEST_TYPE] * 3
    assert [m.metadata.dst_node_id for m in msgs] == [100, 103, 106]
    target = record_logits(msgs[0].content.array_records["consensus"])
    assert torch.equal(target, torch.full((4, 2), 1.0))  # mean of 0, 1, 2
    assert [(r["client"], r["weight"]) for r in strategy.teacher_log.teacher_weights(2)] == [
        (c, pytest.approx(1 / 3)) for c in range(3)]
    # the round's train metrics carry the pre-training of the one client that did it
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-examples": 10,
                                                            "train-loss": 1.0,
                                                            "digest-loss": 0.5})}),
                       reply_to=m) for m in msgs]
    _, metrics = strategy.aggregate_train(2, replies)
    assert {k: metrics[k] for k in ("pretrained", "pretrain-public-epochs",
                                    "pretrain-private-epochs", "pretrain-private-val-acc",
                                    "digest-loss")} == {
        "pretrained": 1.0, "pretrain-public-epochs": 5.0, "pretrain-private-epochs": 12.0,
        "pretrain-private-val-acc": 0.75, "digest-loss": 0.5}
    assert 2 not in strategy.pretrain_stats


def test_pretrain_summary_means_over_pretrained_clients_only() -> None:
    def reply(pre: int, pub: float, priv: float, acc: float) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({
            "pretrained": pre, "pretrain-public-epochs": pub, "pretrain-private-epochs": priv,
            "pretrain-private-val-acc": acc})}), dst_node_id=1, message_type=QUERY_TYPE)

    out = pretrain_summary([reply(1, 4, 11, 0.5), reply(1, 0, 13, math.nan),
                            reply(0, 0, 0, 0.0)])
    assert out == {"pretrained": 2.0, "pretrain-public-epochs": 2.0,
                   "pretrain-private-epochs": 12.0, "pretrain-private-val-acc": 0.5}
    none = pretrain_summary([reply(0, 0, 0, 0.0)])
    assert none["pretrained"] == 0.0 and math.isnan(none["pretrain-private-val-acc"])


def test_teacher_context_from_handshake() -> None:
    ctx = teacher_context(_nodes(2))
    assert torch.equal(ctx.num_examples, torch.tensor([10.0, 20.0], dtype=torch.float64))
    assert ctx.label_counts.tolist() == [[1.0, 1.0], [2.0, 1.0]]


def test_bind_requires_public_split() -> None:
    scn = load_scenario(QUICKSTART, ["data.public.fraction=0.0"])
    with pytest.raises(ScenarioError) as err:
        FedMD().bind(build_world(scn))
    assert err.value.path == "data.public.fraction"


def test_unlabeled_public_bind_says_transfer_learning_is_skipped(
        world: World, labeled: World, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedkd"):
        FedMD().bind(world)
    assert "transfer learning on public data is skipped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedkd"):
        FedMD().bind(labeled)
        FedMD(pretrain_public_epochs=0).bind(world)
    assert "transfer learning" not in caplog.text


# ----------------------------------------------------------------------------- client handlers


def _env(world: World, tmp_path: Path, cid: int, strategy: FedMD | None = None,
         **extra: float) -> ClientEnv:
    strategy = strategy or FedMD(alignment_size=50, pretrain_public_epochs=2,
                                 pretrain_private_epochs=2)
    cfg = strategy.round_config(1, train_config_record(world.scenario.clients.train, seed=0))
    return ClientEnv(cid=cid, world=world, store=StateStore(tmp_path / "state"),
                     config=ConfigRecord({**dict(cfg), **extra}))


def _msg(kind: str, content: RecordDict) -> Message:
    return Message(content, dst_node_id=1, message_type=kind)


def _query(env: ClientEnv) -> tuple[torch.Tensor, MetricRecord]:
    reply = fedmd_logits(_msg(QUERY_TYPE, RecordDict({"config": env.config})), env)
    return record_logits(reply.array_records["logits"]), reply.metric_records["metrics"]


def test_pretraining_happens_once_per_client(labeled: World, tmp_path: Path) -> None:
    env = _env(labeled, tmp_path, cid=3)
    first, report = _query(env)
    assert report["pretrained"] == 1
    assert report["pretrain-public-epochs"] == 2 and report["pretrain-private-epochs"] == 2
    saved = env.store.load(3, "model")
    second, again = _query(env)
    assert again["pretrained"] == 0 and again["pretrain-public-epochs"] == 0
    assert torch.equal(first, second)  # the second query trained nothing
    assert all(torch.equal(v, env.store.load(3, "model")[k]) for k, v in saved.items())


def test_labeled_vs_unlabeled_public_path(world: World, labeled: World, tmp_path: Path) -> None:
    """Labeled: the public stage runs and changes the model; unlabeled: it is skipped, and
    the result equals a client pre-trained on private data only."""
    _, lab = _query(_env(labeled, tmp_path / "lab", cid=0))
    _, unl = _query(_env(world, tmp_path / "unl", cid=0))
    assert lab["pretrain-public-epochs"] == 2 and unl["pretrain-public-epochs"] == 0
    assert unl["pretrain-private-epochs"] == 2
    private_only = _env(labeled, tmp_path / "priv", cid=0,
                        strategy=FedMD(alignment_size=50, pretrain_public_epochs=0,
                                       pretrain_private_epochs=2))
    _query(private_only)
    unl_state = StateStore(tmp_path / "unl" / "state").load(0, "model")
    lab_state = StateStore(tmp_path / "lab" / "state").load(0, "model")
    priv_state = private_only.store.load(0, "model")
    assert all(torch.equal(unl_state[k], priv_state[k]) for k in unl_state)
    assert not all(torch.equal(lab_state[k], priv_state[k]) for k in lab_state)


def test_client_digest_moves_towards_consensus(world: World, tmp_path: Path) -> None:
    env = _env(world, tmp_path, cid=0, digest_epochs=3, digest_batch_size=32)
    logits, _ = _query(env)
    assert logits.shape == (50, world.data.num_classes)
    idx = public_subset(len(world.data.public), 50, int(env.config["subset-seed"]))
    target = torch.zeros_like(logits)
    before = logit_mae(logits, target).item()
    no_revisit = ClientEnv(cid=0, world=world, store=env.store,
                           config=ConfigRecord({**dict(env.config), "revisit-epochs": 0}))
    out = fedmd_digest(_msg(DIGEST_TYPE, RecordDict({"config": no_revisit.config,
                                                     "consensus": logits_record(target)})),
                       no_revisit)
    model, existed = env.private_model()
    assert existed
    after = logit_mae(predict(model, world.data.public.x[idx]), target).item()
    assert after < before
    metrics = out.metric_records["metrics"]
    assert metrics["num-examples"] == len(env.data) and math.isnan(metrics["train-loss"])


def test_revisit_with_nulls_is_the_scenarios_local_training(world: World,
                                                            tmp_path: Path) -> None:
    """``lr``, ``revisit_epochs`` and ``revisit_batch_size`` null: exactly ``clients.train``."""
    env = _env(world, tmp_path, cid=2, strategy=FedMD(lr=None, revisit_epochs=None,
                                                      revisit_batch_size=None))
    model, _ = env.private_model()
    twin, _ = env.private_model()
    loss = revisit(model, env)
    expected = train_supervised(twin, env.data.x, env.data.y, env.train_config, seed=env.seed())
    assert loss == expected.loss
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 twin.state_dict().values(), strict=True))
    adam = _env(world, tmp_path, cid=2)  # the reference's Adam, batch 5, 2 epochs
    other, _ = adam.private_model()
    revisit(other, adam)
    assert not torch.equal(other.head.weight, model.head.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_handlers_move_inputs_to_the_models_device(labeled: World, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Phase 0, digest and revisit (FedMD), and transfer learning (local) on a CUDA model."""
    monkeypatch.setattr(ClientEnv, "device", property(lambda self: torch.device("cuda")))
    env = _env(labeled, tmp_path / "fedmd", cid=1)
    logits, report = _query(env)
    assert report["pretrained"] == 1 and torch.isfinite(logits).all()
    out = fedmd_digest(_msg(DIGEST_TYPE, RecordDict({"config": env.config,
                                                     "consensus": logits_record(logits)})), env)
    assert math.isfinite(out.metric_records["metrics"]["train-loss"])
    local = _local_env(labeled, tmp_path / "local", cid=1,
                       strategy=Local(pretrain_public_epochs=2, pretrain_private_epochs=2))
    assert _train_local(local)["pretrain-public-epochs"] == 2


# ----------------------------------------------------------------------------- local baseline


def _local_env(world: World, tmp_path: Path, cid: int, strategy: Local) -> ClientEnv:
    cfg = ConfigRecord({**dict(train_config_record(world.scenario.clients.train, seed=0)),
                        "server-round": 1, **strategy.client_config(1)})
    return ClientEnv(cid=cid, world=world, store=StateStore(tmp_path / "state"), config=cfg)


def _train_local(env: ClientEnv) -> MetricRecord:
    reply = train_local(_msg("train.local", RecordDict({"config": env.config})), env)
    return reply.metric_records["metrics"]


def test_local_default_is_training_alone(labeled: World, tmp_path: Path) -> None:
    env = _local_env(labeled, tmp_path, cid=4, strategy=Local())
    assert "pretrain-public-epochs" not in _train_local(env)
    fresh, _ = _local_env(labeled, tmp_path / "other", cid=4, strategy=Local()).private_model()
    train_supervised(fresh, env.data.x, env.data.y, env.train_config, seed=env.seed())
    saved = env.store.load(4, "model")
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())


def test_local_transfer_learning_is_fedmds_phase_0(labeled: World, tmp_path: Path) -> None:
    """``local`` with ``pretrain_*_epochs`` runs FedMD's phase 0 (same stages, same seeds, the
    same model) once, then trains alone as usual: the paper's "public then private alone"."""
    env = _local_env(labeled, tmp_path / "local", cid=5,
                     strategy=Local(pretrain_public_epochs=2, pretrain_private_epochs=3))
    first = _train_local(env)
    assert (first["pretrain-public-epochs"], first["pretrain-private-epochs"]) == (2, 3)
    first_round = env.store.load(5, "model")
    again = _train_local(env)  # once per client
    assert (again["pretrain-public-epochs"], again["pretrain-private-epochs"]) == (0, 0)
    fedmd = _env(labeled, tmp_path / "fedmd", cid=5,
                 strategy=FedMD(alignment_size=50, pretrain_public_epochs=2,
                                pretrain_private_epochs=3))
    _query(fedmd)  # FedMD's phase 0, saved before any digest
    phase0 = fedmd.store.load(5, "model")
    model, _ = _local_env(labeled, tmp_path / "twin", cid=5, strategy=Local()).private_model()
    public, private = stages_from(env.config, PUBLIC_PRETRAIN, PRIVATE_PRETRAIN)
    assert public == Pretrain(epochs=2, batch_size=128, lr=1e-3, patience=3)
    assert private == Pretrain(epochs=3, batch_size=32, lr=1e-3, patience=10)
    transfer_learning(model, env, public, private)
    assert all(torch.equal(phase0[k], v) for k, v in model.state_dict().items())
    train_supervised(model, env.data.x, env.data.y, env.train_config, seed=env.seed())
    assert all(torch.equal(first_round[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- CLI


HETERO = "clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.5}]"


def test_cli_fedmd_heterogeneous_two_rounds(world: World, tmp_path: Path) -> None:
    run = simulate_inline(tmp_path, "strategy.name=fedmd", "rounds=2", HETERO,
                          "data.public.labeled=true", "strategy.params.pretrain_public_epochs=3",
                          "strategy.params.pretrain_private_epochs=5")
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    n_align = min(5000, len(world.data.public))  # the whole public split
    logits_bytes = n_align * world.data.num_classes * 4 + 128
    weights_bytes = sum(p.numel() * 4 for p in world.new_model("cnn_small", 0).parameters())
    for r in rows:
        assert 0.1 < r["acc"] <= 1.0  # above chance (10 classes)
        assert r["failures"] == 0 and r["participants"] == 10
        assert r["bytes_up"] == r["bytes_down"] == 10 * logits_bytes
        assert r["bytes_up"] < weights_bytes  # all ten uploads < ONE cnn_small's weights
    # every client pre-trains in round 1 (3 public epochs, at most 5 private), none after
    assert rows[0]["pretrained"] == 10 and rows[1]["pretrained"] == 0
    assert rows[0]["pretrain_public_epochs"] == 3
    assert 1 <= rows[0]["pretrain_private_epochs"] <= 5
    clients = pq.read_table(run / "clients.parquet").to_pylist()
    assert {c["arch"] for c in clients} == {"cnn_small", "mlp"}
    assert {c["bytes_up"] for c in clients} == {logits_bytes}
    teachers = [t for t in pq.read_table(run / "teachers.parquet").to_pylist()
                if t["client"] >= 0 and t["class"] == -1]
    assert len(teachers) == 20 and all(t["weight"] == pytest.approx(0.1) for t in teachers)
    assert rows[1]["train_loss"] is not None
