"""Tests for strategies.fedgen (label weights, generator, losses, schedule, messages, CLI)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from cli_runs import simulate_inline
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedkd.client import ClientEnv, train_config_record
from fedkd.comm import array_bytes, state_dict_to_arrayrecord
from fedkd.compose import load_scenario
from fedkd.distill import diversity_loss, kd_kl
from fedkd.errors import ScenarioError
from fedkd.feature_generator import (
    Heads,
    build_generator,
    client_regulariser,
    generator_loss,
    weighted_teacher_ce,
)
from fedkd.models import build_model
from fedkd.scenario import TrainConfig
from fedkd.state import StateStore
from fedkd.train import batch_indices, train_supervised
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.fedavg import NodeInfo
from strategies.fedgen import (
    PRESETS,
    TRAIN_TYPE,
    ClientParams,
    FedGen,
    check_latent_dims,
    client_lr,
    counting_labels,
    decayed,
    fedgen_extra_loss,
    label_pool,
    local_train_config,
    reply_label_counts,
    train_fedgen,
)
from strategies.weighting import TeacherContext

ROOT = Path(__file__).resolve().parents[1]


def _infos(counts: list[list[int]]) -> list[NodeInfo]:
    return [NodeInfo(node_id=100 + i, cid=i, arch="mlp", num_examples=sum(c),
                     label_counts=tuple(c)) for i, c in enumerate(counts)]


def _ctx(counts: list[list[int]]) -> TeacherContext:
    return FedGen().teacher_context(_infos(counts))


# ----------------------------------------------------------------------------- label weights
def test_registered() -> None:
    assert get_strategy("fedgen") is FedGen


def test_label_weights_count_ratio_and_unheld_class_uniform() -> None:
    ctx = _ctx([[3, 1, 0], [1, 1, 0]])
    w = FedGen().weights_fn(ctx)(torch.zeros(2, 3, 3), torch.tensor([0, 1, 2]))
    expected = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.5, 0.5]])
    torch.testing.assert_close(w, expected, rtol=0, atol=0)
    # only labels somebody holds are generated
    assert label_pool(ctx.label_counts).tolist() == [0, 1]


def test_label_weighting_off_uses_weighting_plug() -> None:
    ctx = _ctx([[3, 1, 0], [1, 1, 0]])
    w = FedGen(label_weighting=False).weights_fn(ctx)(torch.zeros(2, 4, 3),
                                                      torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(w, torch.full((4, 2), 0.5))
    with pytest.raises(Exception, match="weighting"):
        FedGen(label_weighting=False, weighting="no-such-weighting")


# ----------------------------------------------------------------------------- presets
def test_presets_pinned() -> None:
    assert FedGen().preset == "stable"
    assert FedGen().params == PRESETS["stable"] == ClientParams(
        generative_alpha=1.0, generative_beta=1.0, client_lr=None, client_momentum=None,
        client_weight_decay=None, client_lr_decay=1.0, label_counts="dataset")
    assert FedGen(preset="paper").params == PRESETS["paper"] == ClientParams(
        generative_alpha=10.0, generative_beta=10.0, client_lr=0.01, client_momentum=0.0,
        client_weight_decay=0.0, client_lr_decay=0.99, label_counts="drawn")
    # explicit parameters override the preset, one by one
    mixed = FedGen(preset="paper", generative_alpha=1.0, label_counts="dataset").params
    assert (mixed.generative_alpha, mixed.generative_beta, mixed.client_lr,
            mixed.label_counts) == (1.0, 10.0, 0.01, "dataset")
    assert FedGen(client_lr=0.02).params.client_lr == 0.02


def test_preset_client_config() -> None:
    stable = FedGen().client_config(3)
    assert stable["fedgen-alpha"] == stable["fedgen-beta"] == 1.0
    assert not {"lr", "momentum", "weight-decay", "fedgen-lr-decay"} & set(stable)
    paper = FedGen(preset="paper").client_config(3)
    assert paper["fedgen-alpha"] == paper["fedgen-beta"] == 10.0
    assert (paper["lr"], paper["momentum"], paper["weight-decay"],
            paper["fedgen-lr-decay"]) == (0.01, 0.0, 0.0, 0.99)


def test_bad_params_name_the_key() -> None:
    for kwargs, key in [({"preset": "fast"}, "preset"), ({"client_lr_decay": 1.5},
                        "client_lr_decay"), ({"label_counts": "all"}, "label_counts"),
                        ({"generative_alpha": -1.0}, "generative_alpha"),
                        ({"client_momentum": 1.0}, "client_momentum"),
                        ({"client_lr": 0.0}, "client_lr")]:
        with pytest.raises(ScenarioError) as err:
            FedGen(**kwargs)
        assert err.value.path == f"strategy.params.{key}"


def test_paper_lr_decay_lags_one_round() -> None:
    """The code's ``ExponentialLR(0.99).step(glob_iter)`` after local training: 0-based round t
    trains at ``0.01 * 0.99**max(t - 1, 0)``; fedkd's round r = t + 1."""
    lrs = [client_lr(0.01, 0.99, r) for r in (1, 2, 3, 4, 12)]
    assert lrs == pytest.approx([0.01, 0.01, 0.0099, 0.009801, 0.01 * 0.99 ** 10], rel=1e-12)
    base = TrainConfig(lr=0.01, momentum=0.0, epochs=1, batch_size=8)
    env = SimpleNamespace(train_config=base, server_round=4,
                          config=ConfigRecord({"fedgen-lr-decay": 0.99}))
    assert local_train_config(env).lr == pytest.approx(0.009801)  # type: ignore[arg-type]
    env.config = ConfigRecord({})  # stable: the scenario's config, untouched
    assert local_train_config(env) is base  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- generator
def test_generator_shapes_and_determinism() -> None:
    gen = build_generator(num_classes=10, latent_dim=128, noise_dim=32, hidden_dim=256, seed=3)
    assert gen.body[0].in_features == 32 + 10 and gen.body[0].out_features == 256
    assert isinstance(gen.body[1], nn.BatchNorm1d)
    same = build_generator(10, 128, 32, 256, seed=3)
    for a, b in zip(gen.state_dict().values(), same.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rng = torch.Generator().manual_seed(0)
    eps = gen.noise(5, rng)
    assert eps.shape == (5, 32) and float(eps.min()) >= 0 and float(eps.max()) < 1
    z = gen(torch.tensor([0, 1, 2, 3, 9]), eps)
    assert z.shape == (5, 128)


def test_diversity_loss_toy_value() -> None:
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    out = torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    # pairs (0,1) and (1,0): d2(noise) = 1, d1(out) = 3; diagonal 0 -> mean 6/4
    assert float(diversity_loss(noise, out)) == pytest.approx(math.exp(-1.5), abs=1e-7)


def test_diversity_loss_matches_pairwise_reference_formula() -> None:
    g = torch.Generator().manual_seed(1)
    noise, out = torch.rand(6, 4, generator=g), torch.randn(6, 3, generator=g)
    total = 0.0
    for i in range(6):
        for j in range(6):
            total += float((noise[i] - noise[j]).pow(2).mean() * (out[i] - out[j]).abs().mean())
    assert float(diversity_loss(noise, out)) == pytest.approx(math.exp(-total / 36), rel=1e-6)


# ----------------------------------------------------------------------------- schedule
def test_decay_schedule() -> None:
    assert decayed(10.0, 0) == 10.0
    assert decayed(10.0, 1) == pytest.approx(9.8)
    assert decayed(10.0, 10) == pytest.approx(8.170728068875467)
    assert decayed(10.0, 10_000) == 1e-4  # the reference code's floor


# ----------------------------------------------------------------------------- losses
def test_weighted_teacher_ce() -> None:
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # K=2, N=1, C=2
    w = torch.tensor([[0.25, 0.75]])
    got = weighted_teacher_ce(logits, torch.tensor([0]), w)
    assert float(got) == pytest.approx(0.25 * math.log(2) + 0.75 * -math.log(0.75), rel=1e-6)


def test_generator_loss_terms() -> None:
    heads = Heads(torch.eye(2).repeat(2, 1, 1), torch.zeros(2, 2))
    z = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], requires_grad=True)
    eps = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([0, 1])
    w = torch.full((2, 2), 0.5)
    ce = 0.5 * (-math.log(0.75) + math.log(2))
    div = float(diversity_loss(eps, z.detach()))
    loss, parts = generator_loss(z, eps, y, heads, w, alpha=2.0, eta=3.0)
    assert float(loss.detach()) == pytest.approx(2 * ce + 3 * div, rel=1e-6)
    assert parts["teacher"] == pytest.approx(ce, rel=1e-6) and parts["student"] == 0.0
    student = Heads(torch.zeros(1, 2, 2), torch.zeros(1, 2))  # uniform student
    adv = float(kd_kl(torch.zeros(2, 2), heads.logits(z)[0]))
    loss2, parts2 = generator_loss(z, eps, y, heads, w, [student], alpha=2.0, beta=0.5, eta=3.0)
    assert float(loss2.detach()) == pytest.approx(2 * ce + 3 * div - 0.5 * adv, rel=1e-6)
    assert parts2["student"] == pytest.approx(adv, rel=1e-6)
    loss2.backward()
    assert z.grad is not None


def test_client_regulariser_toy() -> None:
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    logits = torch.zeros(1, 2, requires_grad=True)  # model output: uniform
    z_real = torch.tensor([[math.log(3.0), 0.0]])  # head -> softmax [0.75, 0.25]
    z_gen, y_gen = torch.zeros(1, 2), torch.tensor([0])  # CE = ln 2
    got = client_regulariser(logits, head, z_real, z_gen, y_gen, alpha=2.0, beta=3.0,
                             gen_ratio=0.5)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(target ‖ model)
    assert float(got.detach()) == pytest.approx(0.5 * 2.0 * math.log(2) + 3.0 * kl, rel=1e-6)
    got.backward()
    # the KL target is detached: the head's gradient comes from the generated CE only
    head_ce = torch.autograd.grad(0.5 * 2.0 * F.cross_entropy(head(z_gen), y_gen), head.weight)
    torch.testing.assert_close(head.weight.grad, head_ce[0])
    torch.testing.assert_close(logits.grad, 3.0 * (torch.tensor([[0.5, 0.5]])
                                                  - torch.tensor([[0.75, 0.25]])))


def test_extra_loss_hook_in_train_supervised() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 2, 2), 3, seed=0, hidden=[4])
    gen = build_generator(3, 4, noise_dim=2, hidden_dim=8, seed=0)
    x, y = torch.randn(8, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    labels = torch.tensor([0, 2])
    cfg = TrainConfig(lr=1e-9, momentum=0.0, epochs=1, batch_size=8)
    hook = fedgen_extra_loss(model, gen, y, labels, 2.0, 3.0, 4, 8,
                             torch.Generator().manual_seed(5))
    res = train_supervised(model, x, y, cfg, seed=0, extra_loss=hook)
    assert not gen.training
    # recompute the one step by hand with the same random stream
    rng = torch.Generator().manual_seed(5)
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    y_gen = labels[torch.randint(2, (4,), generator=rng)]
    with torch.no_grad():
        z_real = gen(y[idx], gen.noise(8, rng))
        z_gen = gen(y_gen, gen.noise(4, rng))
        logits = model(x[idx])
        want = F.cross_entropy(logits, y[idx]) + client_regulariser(
            logits, model.head, z_real, z_gen, y_gen, 2.0, 3.0, 0.5)
    assert res.loss == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------------------- server
def test_latent_dims_must_agree() -> None:
    assert check_latent_dims({"cnn_small": 128, "mlp": 128}) == 128
    with pytest.raises(ScenarioError) as err:
        check_latent_dims({"cnn_small": 128, "resnet8": 64})
    assert err.value.path == "clients.models"
    world = SimpleNamespace(
        groups=("cnn_small", "resnet8"), data=SimpleNamespace(num_classes=10),
        scenario=SimpleNamespace(server=SimpleNamespace(teacher_diagnostics=True)),
        new_model=lambda arch, seed: build_model(arch, (1, 8, 8), 10, seed=seed))
    with pytest.raises(ScenarioError, match="clients.models"):
        FedGen().bind(world)  # type: ignore[arg-type]


def _heads(k: int, c: int, d: int, seed: int) -> tuple[Heads, list[ArrayRecord]]:
    models = [nn.Linear(d, c) for _ in range(k)]
    g = torch.Generator().manual_seed(seed)
    recs = []
    for m in models:
        with torch.no_grad():
            m.weight.copy_(torch.randn(c, d, generator=g))
        recs.append(state_dict_to_arrayrecord(
            {"body.w": torch.ones(1), **{f"head.{k}": v for k, v in m.state_dict().items()}}))
    return Heads.from_records(recs), recs


def test_train_generator_records_weights_and_is_deterministic() -> None:
    counts = [[5, 0, 0, 1], [5, 5, 0, 1]]
    teachers, _ = _heads(2, 4, 6, seed=0)
    runs = []
    for _ in range(2):
        s = FedGen(seed=7, generator_steps=20, generator_lr=1e-2, hidden_dim=16, noise_dim=4)
        s.train_generator(1, teachers, [], _infos(counts))
        runs.append(s)
    a, b = runs
    for x, y in zip(a.generator.state_dict().values(), b.generator.state_dict().values(),
                    strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a.generator_labels == [0, 1, 3]  # class 2 is held by nobody
    rows = a.teacher_log.teacher_weights(1)
    assert [r["client"] for r in rows] == [0, 1]
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0)
    assert 0.1 < rows[0]["weight"] < 0.5  # labels 0 and 3 weigh 1/2, label 1 weighs 0
    assert a.generator_record is not None and "out.weight" in a.generator_record
    assert a.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.98)
    losses = a.generator_losses[1]
    assert set(losses) == {"teacher", "diversity", "student"}


def test_generator_learns_the_teachers_labels() -> None:
    teachers, _ = _heads(3, 4, 8, seed=2)
    s = FedGen(seed=0, generator_steps=60, generator_lr=3e-2, hidden_dim=32, noise_dim=4,
               generator_batch_size=16)
    s.train_generator(1, teachers, [], _infos([[3, 3, 3, 3]] * 3))
    gen = s.generator.eval()
    y = torch.arange(4).repeat(8)
    with torch.no_grad():
        z = gen(y, gen.noise(len(y), torch.Generator().manual_seed(9)))
    acc = (teachers.logits(z).mean(0).argmax(1) == y).float().mean()
    assert float(acc) > 0.9


def test_train_messages_carry_generator_once_trained() -> None:
    s = FedGen(seed=0, generator_steps=2, hidden_dim=8, noise_dim=4)
    s.nodes = _infos([[2, 2, 0, 0], [0, 2, 2, 0]])
    model = {"head.weight": torch.zeros(4, 6), "head.bias": torch.zeros(4)}
    s.current = {"mlp": state_dict_to_arrayrecord(model)}
    (m1, _) = s.train_messages(1, s.nodes, ConfigRecord({"lr": 0.1}))
    assert m1.metadata.message_type == f"{MessageType.TRAIN}.fedgen"
    assert set(m1.content.array_records) == {"arrays"}
    assert m1.content.config_records["config"]["gen-labels"] == []
    teachers, _ = _heads(2, 4, 6, seed=0)
    s.train_generator(1, teachers, [], s.nodes)
    (m2, _) = s.train_messages(2, s.nodes, ConfigRecord({"lr": 0.1}))
    assert set(m2.content.array_records) == {"arrays", "generator"}
    cfg = m2.content.config_records["config"]
    assert cfg["gen-labels"] == [0, 1, 2] and cfg["server-round"] == 2
    assert cfg["fedgen-alpha"] == 1.0 and cfg["fedgen-beta"] == 1.0
    assert array_bytes(m2.content.array_records["generator"]) == array_bytes(
        state_dict_to_arrayrecord(s.generator.state_dict()))


# ----------------------------------------------------------------------------- label counts
def test_counting_labels_on_a_toy_batch() -> None:
    y = torch.tensor([0, 2, 2, 1, 2, 0])
    counts = torch.ones(4, dtype=torch.long)  # the code's counts start at 1 for every class
    hook = counting_labels(None, y, counts)
    out = hook(torch.tensor([1, 2, 4, 5]), torch.zeros(4, 4))
    assert counts.tolist() == [2, 1, 4, 1] and float(out) == 0.0
    hook(torch.tensor([0, 3]), torch.zeros(2, 4))
    assert counts.tolist() == [3, 2, 4, 1]


def test_counting_in_training_counts_every_drawn_label_and_changes_nothing() -> None:
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 0, 1, 2, 2, 2])
    cfg = TrainConfig(lr=0.1, momentum=0.9, epochs=2, batch_size=3)
    plain = build_model("mlp", (1, 2, 2), 4, seed=0, hidden=[4])
    counted = build_model("mlp", (1, 2, 2), 4, seed=0, hidden=[4])
    counts = torch.ones(4, dtype=torch.long)
    a = train_supervised(plain, x, y, cfg, seed=3)
    b = train_supervised(counted, x, y, cfg, seed=3, extra_loss=counting_labels(None, y, counts))
    # two epochs draw every sample twice: 1 + 2 * (2, 1, 3, 0)
    assert counts.tolist() == [5, 3, 7, 1]
    assert a.loss == b.loss
    for p, q in zip(plain.parameters(), counted.parameters(), strict=True):
        assert torch.equal(p, q)


def test_drawn_counts_set_teacher_weights_and_label_pool() -> None:
    """Drawn counts (K=2 teachers, C=3): label 2 was drawn by nobody (counts 1, 1)."""
    drawn = torch.tensor([[3.0, 1.0, 1.0], [1.0, 2.0, 1.0]])
    assert label_pool(drawn, 1).tolist() == [0, 1]
    s = FedGen(preset="paper", seed=0, generator_steps=2, hidden_dim=8, noise_dim=4)
    ctx = s.teacher_context(_infos([[9, 9, 9], [9, 9, 9]]), drawn)
    w = s.weights_fn(ctx)(torch.zeros(2, 3, 3), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25], [1 / 3, 2 / 3], [0.5, 0.5]]))
    teachers, _ = _heads(2, 3, 6, seed=0)
    s.train_generator(1, teachers, [], _infos([[9, 9, 9], [9, 9, 9]]), drawn)
    assert s.generator_labels == [0, 1]  # the handshake counts would give [0, 1, 2]


def _reply(node_id: int, record: ArrayRecord, counts: list[int]) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node_id,
                          message_type=TRAIN_TYPE)
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": 4, "train-loss": 1.0, "label-counts": counts})}), reply_to=instruction)


@pytest.mark.parametrize(("preset", "labels"), [("paper", [0]), ("stable", [0, 1, 2])])
def test_aggregate_uses_reply_counts_in_paper_preset(preset: str, labels: list[int]) -> None:
    _, recs = _heads(2, 3, 6, seed=1)
    s = FedGen(preset=preset, seed=0, generator_steps=2, hidden_dim=8, noise_dim=4)
    s.nodes = _infos([[1, 1, 1], [1, 1, 1]])
    s.current = {"mlp": recs[0]}
    replies = [_reply(100, recs[0], [4, 1, 1]), _reply(101, recs[1], [1, 1, 1])]
    assert reply_label_counts(replies).tolist() == [[4, 1, 1], [1, 1, 1]]
    _, metrics = s.aggregate_train(1, replies)
    assert s.generator_labels == labels
    assert metrics is not None and "label-counts" not in metrics


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(str(ROOT / "scenarios" / "quickstart.yaml")))


def test_client_reply_reports_drawn_counts(world: World, tmp_path: Path) -> None:
    cfg = dict(train_config_record(world.scenario.clients.train, seed=0))
    cfg.update(FedGen(preset="paper").client_config(1))
    env = ClientEnv(cid=2, world=world, store=StateStore(tmp_path), config=ConfigRecord(
        {**cfg, "server-round": 1}))
    model = world.new_model(env.arch, seed=0)
    msg = Message(RecordDict({"arrays": state_dict_to_arrayrecord(model.state_dict()),
                              "config": env.config}), dst_node_id=1, message_type=TRAIN_TYPE)
    reply = train_fedgen(msg, env)
    got = reply.metric_records["metrics"]["label-counts"]
    y, train = env.data.y, env.train_config
    want = torch.ones(world.data.num_classes, dtype=torch.long)
    for idx in batch_indices(len(y), train.batch_size, torch.Generator().manual_seed(env.seed()),
                             epochs=train.epochs, steps=train.steps):
        want += torch.bincount(y[idx], minlength=len(want))
    assert got == want.tolist() and sum(got) > world.data.num_classes
    assert env.train_config.lr == 0.01 and env.train_config.momentum == 0.0


# ----------------------------------------------------------------------------- CLI
def test_cli_two_rounds_bytes(tmp_path: Path) -> None:
    run = simulate_inline(tmp_path, "strategy.name=fedgen", "rounds=2")
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["failures"] == 0 and r["participants"] == 10 for r in rows)
    assert all(r["acc"] is not None and 0.0 <= r["acc"] <= 1.0 for r in rows)
    # fedavg's download: each of the 10 clients receives the cnn_small model
    model_bytes = array_bytes(state_dict_to_arrayrecord(
        build_model("cnn_small", (1, 8, 8), 10, seed=0).state_dict()))
    gen_bytes = array_bytes(state_dict_to_arrayrecord(
        build_generator(10, 128, 32, 256).state_dict()))
    assert rows[0]["bytes_down"] == 10 * model_bytes  # no generator before it is trained
    assert rows[1]["bytes_down"] == 10 * (model_bytes + gen_bytes)
    assert all(r["bytes_up"] == 10 * model_bytes for r in rows)
    teachers = [t for t in pq.read_table(run / "teachers.parquet").to_pylist()
                if t["client"] >= 0 and t["class"] == -1]
    assert sorted({r["round"] for r in teachers}) == [1, 2]
    assert sum(r["weight"] for r in teachers if r["round"] == 1) == pytest.approx(1.0)


@pytest.mark.slow
def test_cli_paper_preset_two_rounds(tmp_path: Path) -> None:
    """The paper preset end to end: same traffic as the stable one (label counts travel as
    metrics), teacher weights from the drawn counts sum to one every round."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", "scenarios/quickstart.yaml",
         "--set", "strategy.name=fedgen", "--set", "strategy.params.preset=paper",
         "--set", "rounds=2", "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["failures"] for r in rows] == [0, 0]
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows)
    model_bytes = array_bytes(state_dict_to_arrayrecord(
        build_model("cnn_small", (1, 8, 8), 10, seed=0).state_dict()))
    assert all(r["bytes_up"] == 10 * model_bytes for r in rows)
    teachers = pq.read_table(run / "teachers.parquet").to_pylist()
    for rnd in (1, 2):
        assert sum(r["weight"] for r in teachers if r["round"] == rnd) == pytest.approx(1.0)
