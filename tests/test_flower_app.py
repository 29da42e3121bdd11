"""fedkd strategies in a plain Flower app: Flower's ``start`` loop, a ClientApp without fedkd."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from grids import PlainGrid

from strategies.fedavg import FedAvg

ROOT = Path(__file__).resolve().parents[1]


INITIAL = ArrayRecord({"fc.weight": Array(np.zeros((2, 3), np.float32)),
                       "fc.bias": Array(np.ones(2, np.float32))})


def test_fedavg_falls_back_to_flower_behaviour_without_handshake() -> None:
    grid = PlainGrid([907, 11, 5030, 42])
    ours = FedAvg(fraction_train=0.5, min_available_nodes=4, seed=3)
    msgs = list(ours.configure_train(1, INITIAL, ConfigRecord(), grid))
    assert ours.plain and [n.arch for n in ours.nodes] == [""] * 4
    assert [n.node_id for n in ours.nodes] == [11, 42, 907, 5030]  # sorted node ids
    expected = np.sort(np.random.default_rng([3, 1]).choice(4, size=2, replace=False))
    assert [m.metadata.dst_node_id for m in msgs] == [[11, 42, 907, 5030][i] for i in expected]
    assert set(msgs[0].content["arrays"].keys()) == {"fc.weight", "fc.bias"}  # model's keys
    replies = list(grid.send_and_receive(msgs))
    arrays, metrics = ours.aggregate_train(1, replies)
    flower_arrays, flower_metrics = FlowerFedAvg().aggregate_train(1, replies)
    assert arrays is not None and flower_arrays is not None
    for key in ("fc.weight", "fc.bias"):
        np.testing.assert_allclose(arrays[key].numpy(), flower_arrays[key].numpy(), rtol=1e-6)
    assert dict(metrics or {}) == pytest.approx(dict(flower_metrics or {}))
    # a second round samples again with the seed and sends the aggregated model
    again = list(ours.configure_train(2, arrays, ConfigRecord(), grid))
    assert len(again) == 2 and sum(m.metadata.message_type == "query.hello"
                                   for m in grid.sent) == 4  # handshake tried once


def test_flower_start_drives_fedavg_on_a_plain_client_app() -> None:
    grid = PlainGrid([3, 1, 2])
    result = FedAvg(fraction_train=1.0, min_available_nodes=3).start(
        grid=grid, initial_arrays=INITIAL, num_rounds=2)
    # each round adds the num-examples-weighted mean of k = 1, 2, 3: (10+40+90)/60
    np.testing.assert_allclose(result.arrays["fc.bias"].numpy(), 1 + 2 * 140 / 60, rtol=1e-6)


@pytest.fixture(scope="module")
def flower_app_result() -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from flower_app.client_app import app as client_app
        from flower_app.server_app import RESULT
        from flower_app.server_app import app as server_app
        from flwr.simulation import run_simulation

        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=4,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}})
        return dict(RESULT)
    finally:
        sys.path.remove(str(ROOT / "examples"))


def test_example_flower_app_runs_feddf(flower_app_result: dict) -> None:
    """examples/flower_app: FedDF distils on the server and the global model learns."""
    strategy, result = flower_app_result["strategy"], flower_app_result["result"]
    assert strategy.plain and len(strategy.nodes) == 4
    assert sorted(strategy.distill_log) == [1, 2, 3]
    for stats in strategy.distill_log.values():
        assert stats["distill-steps"] > 0
        assert stats["val-acc-distilled"] >= stats["val-acc-avg"]  # kept the best on val
    acc = {r: m["accuracy"] for r, m in result.evaluate_metrics_serverapp.items()}
    assert sorted(acc) == [0, 1, 2, 3]
    print("test accuracy by round:", acc)
    assert acc[0] < 0.2 and acc[3] > 0.6, acc
    assert set(result.arrays.keys()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
