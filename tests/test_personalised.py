"""Personalised evaluation: local test splits, their metrics, records and the off-switch."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedkd.client import ClientEnv, WorldSource, evaluate_local, evaluate_private, hello
from fedkd.comm import state_dict_to_arrayrecord
from fedkd.compose import build_strategy, load_scenario
from fedkd.data.partition import PARTITIONERS, class_counts
from fedkd.engine.inline import InlineGrid
from fedkd.engine.recorder import RunRecorder
from fedkd.engine.runner import RoundResult, local_evaluate, run_rounds
from fedkd.report import report
from fedkd.scenario import dump
from fedkd.state import StateStore
from fedkd.train import evaluate
from fedkd.world import World, build_world, local_summary
from strategies import get_strategy
from strategies.local import Local

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
LOCAL_TEST = "data.local_test_fraction=0.2"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(world: World, run_dir: Path, record: bool = False) -> list[RoundResult]:
    """All rounds of the world's scenario in process; optionally with the run records."""
    strategy = build_strategy(world.scenario, world)
    results: list[RoundResult] = []
    recorder = RunRecorder(world, run_dir, strategy, progress=False) if record else None

    def on_round(res: RoundResult) -> None:
        results.append(res)
        if recorder is not None:
            recorder(res)

    grid = InlineGrid(world, WorldSource(dump(world.scenario), str(run_dir)))
    end = run_rounds(world, strategy, grid, on_round)
    if recorder is not None:
        recorder.close(end.status)
    return results


# ----------------------------------------------------------------------------- metrics


def test_local_summary_exact() -> None:
    out = local_summary([0.5, 0.9, 0.1, math.nan, 0.7], [1.0, 2.0, 3.0, math.nan, 6.0])
    # four clients with a split: mean 0.55; worst 10 % of 4 -> max(1, 0) = 1 client: 0.1;
    # population std: deviations -.45, -.05, .15, .35 -> sqrt(.35 / 4)
    assert out == {"local-acc": pytest.approx(0.55), "local-acc-worst10": pytest.approx(0.1),
                   "local-acc-std": pytest.approx(math.sqrt(0.0875)),
                   "local-loss": pytest.approx(3.0)}
    twenty = local_summary([i / 20 for i in range(20)])  # worst 2 of 20: (0 + 0.05) / 2
    assert twenty["local-acc-worst10"] == pytest.approx(0.025) and "local-loss" not in twenty
    assert local_summary([math.nan]) == {} and local_summary([]) == {}


def _eval_reply(node: int, acc: float, local: tuple[float, float] | None) -> Message:
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                          message_type="evaluate.private")
    metrics: dict[str, float | int] = {"num-examples": 360, "eval-acc": acc, "eval-loss": 1.0}
    if local is not None:
        metrics.update({"local-acc": local[0], "local-loss": local[1],
                        "local-num-examples": 20})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=instruction)


@pytest.mark.parametrize("name", ["local", "dml", "fedmd"])
def test_private_model_strategies_report_local_metrics(name: str) -> None:
    strategy = get_strategy(name)()
    assert isinstance(strategy, Local)
    instruction = Message(RecordDict(), dst_node_id=9, message_type="evaluate.private")
    replies = [_eval_reply(1, 0.2, (0.8, 0.5)), _eval_reply(2, 0.4, (0.4, 1.5)),
               _eval_reply(3, 0.3, None),  # a client without a local test split
               Message(Error(0, "crash"), reply_to=instruction)]
    out = strategy.aggregate_evaluate(1, replies)
    assert out is not None
    assert dict(out) == {"acc": pytest.approx(0.3), "acc-min": pytest.approx(0.2),
                         "loss": 1.0, "local-acc": pytest.approx(0.6),
                         "local-acc-worst10": pytest.approx(0.4),
                         "local-acc-std": pytest.approx(0.2), "local-loss": pytest.approx(1.0)}
    plain = strategy.aggregate_evaluate(1, [_eval_reply(1, 0.2, None)])
    assert plain is not None and set(plain) == {"acc", "acc-min", "loss"}


# ----------------------------------------------------------------------------- the split


@pytest.fixture(scope="module")
def world() -> World:
    """Quickstart (digits, 10 Dirichlet clients) with a 20 % local test split per client."""
    return build_world(load_scenario(QUICKSTART, [LOCAL_TEST]))


def test_local_test_split_is_held_out_of_training(world: World) -> None:
    whole = build_world(load_scenario(QUICKSTART))
    labels = world.data.pool.y.numpy()
    for cid in range(world.num_clients):
        train, test = world.parts[cid], world.local_tests[cid]
        assert not np.intersect1d(train, test).size
        assert np.array_equal(np.sort(np.concatenate([train, test])), whole.parts[cid])
        assert len(test) == int(math.floor(0.2 * len(whole.parts[cid]) + 0.5))
        assert torch.equal(world.client_data(cid).y, torch.from_numpy(labels[train]))
        assert torch.equal(world.local_test_data(cid).y, torch.from_numpy(labels[test]))
    # the handshake's sizes and label counts are the training part's only
    assert np.array_equal(world.counts, class_counts(labels, list(world.parts), 10))
    env = ClientEnv(cid=3, world=world, store=StateStore("/nonexistent"), config=ConfigRecord())
    m = hello(Message(RecordDict(), dst_node_id=1, message_type="query.hello"),
              env).metric_records["metrics"]
    assert m["num-examples"] == len(world.parts[3]) == len(whole.parts[3]) - 18
    assert list(m["label-counts"]) == world.counts[3].tolist()
    assert sum(m["label-counts"]) == len(world.parts[3])


def test_client_handlers_evaluate_on_the_local_split(world: World, tmp_path: Path) -> None:
    env = ClientEnv(cid=2, world=world, store=StateStore(tmp_path / "state"),
                    config=ConfigRecord({"seed": 0}))
    model = world.new_model("cnn_small", seed=5)
    env.save_private(model)
    m = evaluate_private(Message(RecordDict(), dst_node_id=1, message_type="evaluate.private"),
                         env).metric_records["metrics"]
    local = world.local_test_data(2)
    loss, acc = evaluate(model, local.x, local.y)
    assert (m["local-acc"], m["local-loss"], m["local-num-examples"]) == (acc, loss, 24)
    assert m["num-examples"] == len(world.data.test)
    # federated evaluation of a received model uses the local split too
    msg = Message(RecordDict({"arrays": state_dict_to_arrayrecord(model.state_dict())}),
                  dst_node_id=1, message_type="evaluate")
    fed = evaluate_local(msg, env).metric_records["metrics"]
    assert (fed["num-examples"], fed["eval-acc"]) == (24, acc)


def test_global_model_local_metrics_match_client_side(world: World) -> None:
    model = world.new_model("cnn_small", seed=11)
    out = local_evaluate(world, {"cnn_small": model}, batch_size=64)
    scores = [evaluate(model, world.local_test_data(c).x, world.local_test_data(c).y)
              for c in range(world.num_clients)]
    expected = local_summary([a for _, a in scores], [loss for loss, _ in scores])
    assert out == pytest.approx(expected, abs=1e-6)
    assert local_evaluate(build_world(load_scenario(QUICKSTART)), {"cnn_small": model}, 64) == {}


# ----------------------------------------------------------------------------- off-switch


#: Measured before ``data.local_test_fraction``/``data.weight_fraction`` existed: the hash of
#: the quickstart world's partition and labels, and round 1 of ``fedkd simulate
#: scenarios/quickstart.yaml --set rounds=1`` (fedavg: 107 of 360 test samples right, loss
#: 2.222118854522705; local: mean private accuracy 0.11222222372889519).
BEFORE = {"world": "44a75987bf200c59", "fedavg": (107 / 360, 2.222118854522705),
          "local": (0.11222222372889519, 3.265471076965332)}


@pytest.mark.parametrize("name", ["fedavg", "local"])
def test_zero_fractions_reproduce_earlier_results(name: str, tmp_path: Path) -> None:
    scn = load_scenario(QUICKSTART, ["rounds=1", f"strategy.name={name}",
                                     "data.local_test_fraction=0", "data.weight_fraction=0"])
    world = build_world(scn)
    digest = hashlib.sha256()
    for part in world.parts:
        digest.update(part.tobytes())
    assert world.data.val is not None
    digest.update(world.data.pool.y.numpy().tobytes())
    digest.update(world.data.val.y.numpy().tobytes())
    assert digest.hexdigest()[:16] == BEFORE["world"]
    assert not world.has_local_tests and world.data.weight is None
    (res,) = _run(world, tmp_path)
    acc, loss = BEFORE[name]
    assert res.eval_metrics["acc"] == pytest.approx(acc, abs=1e-7)
    assert res.eval_metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert not any(k.startswith("local-") for k in res.eval_metrics)


# ----------------------------------------------------------------------------- end to end


def test_local_training_run_records_personalised_accuracy(tmp_path: Path) -> None:
    world = build_world(load_scenario(QUICKSTART, [LOCAL_TEST, "rounds=2",
                                                   "strategy.name=local"]))
    _run(world, tmp_path, record=True)
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    last = rows[-1]
    # private models trained on skewed data: good on their own distribution, poor globally
    assert last["local-acc"] > 0.45 and last["local-acc"] > last["acc"] + 0.25
    assert 0.0 <= last["local-acc-worst10"] <= last["local-acc"]
    assert last["local-acc-std"] > 0.0
    clients = [r for r in pq.read_table(tmp_path / "clients.parquet").to_pylist()
               if r["round"] == 2 and r["local_acc"] is not None]
    assert len(clients) == 10
    assert np.mean([r["local_acc"] for r in clients]) == pytest.approx(last["local-acc"])
    part = pq.read_table(tmp_path / "partition.parquet").to_pydict()
    assert part["num_local_test"] == [len(t) for t in world.local_tests]
    assert json.loads((tmp_path / "summary.json").read_text())["final_local_acc"] == (
        last["local-acc"])
    rows_out, _, text = report([tmp_path], tmp_path / "report")
    assert rows_out[0]["final_local_acc"] == pytest.approx(last["local-acc"])
    assert rows_out[0]["final_local_acc_worst10"] == pytest.approx(last["local-acc-worst10"])
    assert "final local acc" in text


def test_fedavg_reports_the_global_models_local_accuracy(tmp_path: Path) -> None:
    world = build_world(load_scenario(QUICKSTART, [LOCAL_TEST, "rounds=1"]))
    (res,) = _run(world, tmp_path)
    m = res.eval_metrics
    assert {"acc", "local-acc", "local-acc-worst10", "local-acc-std", "local-loss"} <= set(m)
    assert 0.0 <= m["local-acc-worst10"] <= m["local-acc"] <= 1.0
    # the partition before the local split is unchanged: same clients, fewer training samples
    sizes = [len(p) for p in PARTITIONERS.get("dirichlet")(
        world.data.pool.y.numpy(), 10, 10, 0, alpha=0.5, min_size=10)]
    assert [len(p) + len(t) for p, t in zip(world.parts, world.local_tests, strict=True)] == sizes


def test_fml_reports_its_private_models_local_metrics() -> None:
    out = get_strategy("fml")().aggregate_evaluate(
        1, [_eval_reply(1, 0.2, (0.8, 0.5)), _eval_reply(2, 0.4, (0.4, 1.5))])
    assert out is not None
    assert out["acc-private"] == pytest.approx(0.3)
    assert out["local-acc-private"] == pytest.approx(0.6)
    assert out["local-acc-private-worst10"] == pytest.approx(0.4)
    assert out["local-loss-private"] == pytest.approx(1.0) and "local-acc" not in out
