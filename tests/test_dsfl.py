"""DS-FL (Itahara et al. 2021): ERA pinned by hand, the distillation loss, the server round,
the client handlers (0 distillation epochs is training alone) and a heterogeneous CLI run."""

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
from grids import CidGrid

from fedkd.client import ClientEnv, train_config_record
from fedkd.compose import load_scenario
from fedkd.distill import era
from fedkd.errors import ScenarioError
from fedkd.scenario import TrainConfig
from fedkd.state import StateStore
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.dsfl import (
    DISTILL_TYPE,
    DSFL,
    UPDATE_TYPE,
    aggregate_soft_labels,
    distill_soft_labels,
    dsfl_distill,
    dsfl_update,
    mean_entropy,
)
from strategies.fedavg import NodeInfo
from strategies.fedmd import logits_record, public_subset, record_logits
from strategies.local import train_local

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
HETERO = "clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.5}]"
E2 = math.exp(2.0)


# ----------------------------------------------------------------------------- ERA and loss


def test_era_is_softmax_of_mean_probs_over_t() -> None:
    # [0.6, 0.4] / 0.1 = [6, 4]: softmax gives e^2 / (1 + e^2) = 0.880797
    out = era(torch.tensor([[0.6, 0.4]]), 0.1)
    torch.testing.assert_close(out, torch.tensor([[E2 / (1 + E2), 1 / (1 + E2)]]))
    assert mean_entropy(out) < mean_entropy(torch.tensor([[0.6, 0.4]]))  # 0.3653 < 0.6730
    # uniform rows stay uniform; at T = 1 ERA flattens instead of returning the mean
    torch.testing.assert_close(era(torch.full((2, 10), 0.1), 0.1), torch.full((2, 10), 0.1))
    e1 = math.e
    torch.testing.assert_close(era(torch.tensor([1.0, 0.0]), 1.0),
                               torch.tensor([e1 / (1 + e1), 1 / (1 + e1)]))
    # T = 0.5 over 4 classes is not below 1/C: (0.4, 0.2, 0.2, 0.2) flattens to 0.3321
    top = math.exp(0.8) / (math.exp(0.8) + 3 * math.exp(0.4))
    out = era(torch.tensor([0.4, 0.2, 0.2, 0.2]), 0.5)
    assert out[0].item() == pytest.approx(top, rel=1e-6) and top < 0.4


def test_aggregate_sa_is_the_mean_and_era_sharpens_it() -> None:
    probs = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.3, 0.7], [0.5, 0.5]]])  # K=2, N=2
    torch.testing.assert_close(aggregate_soft_labels(probs, "sa"),
                               torch.tensor([[0.6, 0.4], [0.5, 0.5]]))
    torch.testing.assert_close(aggregate_soft_labels(probs, "era", 0.1),
                               torch.tensor([[E2 / (1 + E2), 1 / (1 + E2)], [0.5, 0.5]]))
    with pytest.raises(ScenarioError, match="strategy.params.aggregation"):
        aggregate_soft_labels(probs, "median")


def test_distillation_is_kl_batchmean_with_the_soft_target_gradient() -> None:
    """One SGD step (lr 1, no momentum) of a zero linear model on two samples: the loss is
    KL(target ‖ uniform) averaged over the batch, no T² factor; the bias gradient is
    mean(softmax(s) - target), as for the cross-entropy with soft targets."""
    model = torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    p = E2 / (1 + E2)
    target = torch.tensor([[p, 1 - p], [0.5, 0.5]])
    cfg = TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0, epochs=1, batch_size=4)
    loss = distill_soft_labels(model, torch.zeros(2, 2), target, cfg, epochs=1, seed=0)
    kl = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))  # 0.327814; second row: 0
    assert loss == pytest.approx(kl / 2, rel=1e-6)  # 0.163907
    torch.testing.assert_close(model.bias.detach(), torch.tensor([(p - 0.5) / 2, (0.5 - p) / 2]))
    # zero epochs: no step at all
    before = model.bias.detach().clone()
    assert distill_soft_labels(model, torch.zeros(2, 2), target, cfg, epochs=0, seed=0) == 0.0
    assert torch.equal(model.bias.detach(), before)


# ----------------------------------------------------------------------------- server round


def _nodes(k: int) -> list[NodeInfo]:
    return [NodeInfo(node_id=100 + 3 * cid, cid=cid, arch="cnn_small", num_examples=10,
                     label_counts=(5, 5)) for cid in range(k)]


def fake_grid(strategy: DSFL, n: int) -> CidGrid:
    """Answers update messages: client ``cid`` predicts class ``cid % 2`` with p = 0.9."""
    return CidGrid(strategy, lambda cid: RecordDict({
        "soft-labels": logits_record(torch.tensor([[0.9, 0.1] if cid % 2 == 0 else [0.1, 0.9]]
                                                  * n)),
        "metrics": MetricRecord({"num-examples": 10, "train-loss": float(cid)})}))


def test_configure_train_updates_then_sends_era_soft_labels() -> None:
    strategy = get_strategy("dsfl")(seed=5, open_size=4, distill_epochs=3)
    assert isinstance(strategy, DSFL)
    strategy.nodes = _nodes(3)
    grid = fake_grid(strategy, n=4)
    msgs = list(strategy.configure_train(2, None, ConfigRecord({"lr": 0.1}), grid))
    assert [m.metadata.message_type for m in grid.sent] == [UPDATE_TYPE] * 3
    assert not grid.sent[0].content.array_records  # only the subset seed travels down
    cfg = grid.sent[0].content.config_records["config"]
    assert cfg["subset-size"] == 4 and cfg["subset-seed"] == strategy.subset_seed(2)
    assert cfg["distill-epochs"] == 3 and cfg["distill-lr"] == -1.0
    assert [m.metadata.message_type for m in msgs] == [DISTILL_TYPE] * 3
    assert [m.metadata.dst_node_id for m in msgs] == [100, 103, 106]
    # mean of (0.9, 0.1), (0.1, 0.9), (0.9, 0.1) = (19/30, 11/30); ERA at T = 0.1
    target = record_logits(msgs[0].content.array_records["soft-labels"])
    d = (19 - 11) / 30 / 0.1
    expected = torch.tensor([1 / (1 + math.exp(-d)), 1 / (1 + math.exp(d))])
    torch.testing.assert_close(target, expected.expand(4, 2))  # 0.935030, 0.064970
    reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 10,
                                                         "distill-loss": 0.5})}),
                    reply_to=msgs[0])
    _, metrics = strategy.aggregate_train(2, [reply])
    assert metrics is not None
    assert metrics["train-loss"] == pytest.approx(1.0)  # the update replies' mean (0, 1, 2)
    assert metrics["distill-loss"] == 0.5
    assert metrics["label-entropy"] == pytest.approx(mean_entropy(expected[None]))
    assert metrics["label-entropy-sa"] == pytest.approx(
        mean_entropy(torch.tensor([[19 / 30, 11 / 30]])))


def test_bad_params_name_the_key() -> None:
    for params, key in (({"aggregation": "mean"}, "aggregation"),
                        ({"temperature": 0}, "temperature"), ({"open_size": 0}, "open_size"),
                        ({"distill_epochs": -1}, "distill_epochs"),
                        ({"distill_lr": 0.0}, "distill_lr")):
        with pytest.raises(ScenarioError) as err:
            DSFL(**params)  # type: ignore[arg-type]
        assert err.value.path == f"strategy.params.{key}"
    no_public = build_world(load_scenario(QUICKSTART, ["data.public.fraction=0.0"]))
    with pytest.raises(ScenarioError) as err:
        DSFL().bind(no_public)
    assert err.value.path == "data.public.fraction"


# ----------------------------------------------------------------------------- client handlers


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART, [HETERO]))


def _env(world: World, tmp_path: Path, cid: int, epochs: int) -> ClientEnv:
    cfg = {**dict(train_config_record(world.scenario.clients.train, seed=0)),
           "server-round": 1, "subset-seed": 9, "subset-size": 60, "distill-epochs": epochs,
           "distill-lr": -1.0}
    return ClientEnv(cid=cid, world=world, store=StateStore(tmp_path / "state"),
                     config=ConfigRecord(cfg))


def _run_dsfl(world: World, tmp_path: Path, cid: int, epochs: int,
              target: torch.Tensor | None = None) -> tuple[ClientEnv, torch.Tensor]:
    env = _env(world, tmp_path, cid, epochs)
    reply = dsfl_update(Message(RecordDict({"config": env.config}), dst_node_id=1,
                                message_type=UPDATE_TYPE), env)
    probs = record_logits(reply.array_records["soft-labels"])
    labels = era(probs, 0.1) if target is None else target
    dsfl_distill(Message(RecordDict({"config": env.config, "soft-labels": logits_record(labels)}),
                         dst_node_id=1, message_type=DISTILL_TYPE), env)
    return env, probs


def test_zero_distill_epochs_is_training_alone(world: World, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    for cid in (0, 1):  # a cnn_small and an mlp client: any architecture works
        env, probs = _run_dsfl(world, tmp_path / f"dsfl{cid}", cid, epochs=0)
        assert probs.shape == (60, world.data.num_classes)
        torch.testing.assert_close(probs.sum(1), torch.ones(60))  # probabilities, not logits
        alone = _env(world, tmp_path / f"local{cid}", cid, epochs=0)
        train_local(Message(RecordDict({"config": alone.config}), dst_node_id=1,
                            message_type="train.local"), alone)
        mine, theirs = env.store.load(cid, "model"), alone.store.load(cid, "model")
        assert mine is not None and theirs is not None
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_distillation_moves_the_private_model_towards_the_labels(world: World,
                                                                 tmp_path: Path) -> None:
    torch.set_num_threads(1)
    target = torch.zeros(60, world.data.num_classes)
    target[:, 3] = 1.0  # everything is a 3
    env, probs = _run_dsfl(world, tmp_path, 1, epochs=2, target=target)
    model, existed = env.private_model()
    assert existed
    x = world.data.public.x[public_subset(len(world.data.public), 60, 9)]
    after = torch.softmax(model.eval()(x), 1)[:, 3].mean().item()
    assert after > probs[:, 3].mean().item() + 0.2


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow  # the contract test runs every strategy in process
def test_cli_dsfl_heterogeneous_two_rounds(world: World, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART), "--set",
         "strategy.name=dsfl", "--set", "rounds=2", "--set", HETERO, "--out", str(tmp_path),
         "--no-progress"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    assert world.data.public is not None
    labels_bytes = min(1000, len(world.data.public)) * world.data.num_classes * 4 + 128
    for r in rows:
        assert r["failures"] == 0 and r["participants"] == 10
        # soft labels up (update) and down (distil), nothing else: 10 x 5,888 B each way
        assert r["bytes_up"] == r["bytes_down"] == 10 * labels_bytes
        assert 0.0 <= r["label_entropy"] <= math.log(10) + 1e-6
        assert np.isfinite(r["distill_loss"]) and 0.0 <= r["acc"] <= 1.0
    clients = pq.read_table(run / "clients.parquet").to_pylist()
    assert {c["arch"] for c in clients} == {"cnn_small", "mlp"}
