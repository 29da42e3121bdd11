"""The virtual clock: exact on a hand-computed 3-client case; stragglers, availability, FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from grids import PlainGrid

from fedkd.clock import Clock, ClockGrid, Device, client_train_flops, train_flops_per_sample
from fedkd.compose import from_dict
from fedkd.engine.runner import AccountingGrid
from fedkd.world import build_world
from strategies.fedavg import FedAvg

MODEL = ArrayRecord({"w": Array(np.zeros(1000, np.float32))})
BYTES = 4000 + 128  # one float32 array of 1,000 entries, NumPy-serialized


def test_train_flops_are_forward_and_backward_per_sample() -> None:
    # forward 2·10·4 = 80; backward: weight gradient 80 (the input needs no gradient)
    assert train_flops_per_sample(torch.nn.Linear(10, 4), (10,)) == 160
    # + second layer: forward 24, weight gradient 24, input gradient 24
    two = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    assert train_flops_per_sample(two, (10,)) == 232


@pytest.mark.parametrize("train", [{"epochs": 2}, {"steps": 3, "batch_size": 8}])
def test_client_train_flops_weigh_each_clients_architecture_and_samples(train: dict) -> None:
    world = build_world(from_dict({
        "name": "flops", "partition": {"name": "dirichlet", "params": {"alpha": 0.3}},
        "data": {"name": "digits"},
        "clients": {"num": 6, "train": train,
                    "models": [{"arch": "mlp", "fraction": 0.5},
                               {"arch": "cnn_small", "fraction": 0.5}]}}))
    shape = world.data.input_shape
    per_sample = {a: train_flops_per_sample(world.new_model(a, seed=0), shape)
                  for a in ("mlp", "cnn_small")}
    assert per_sample["cnn_small"] > 10 * per_sample["mlp"]
    samples = [3 * 8] * 6 if "steps" in train else [2 * len(p) for p in world.parts]
    assert client_train_flops(world) == [per_sample[a] * n
                                         for a, n in zip(world.archs, samples, strict=True)]


def _round(clock: Clock) -> tuple[ClockGrid, AccountingGrid, list]:
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=3)
    acct = AccountingGrid(PlainGrid([100, 101, 102]))
    grid = ClockGrid(acct, clock, lambda nid: strategy.node(nid).cid)
    strategy.discover(grid)  # a plain ClientApp answers the handshake with errors
    acct.reset()
    msgs = list(strategy.configure_train(1, MODEL, ConfigRecord(), grid))
    return grid, acct, list(grid.send_and_receive(msgs))


def test_three_clients_by_hand() -> None:
    """c0: 1 GFLOP at 1 GFLOP/s + 4,128 B each way at 1 Mbit/s = 1 + 2·0.033024 s;
    c1: 1 GFLOP at 2 GFLOP/s + each way at 10 Mbit/s = 0.5 + 2·0.0033024 s;
    c2: 1 GFLOP at 0.5 GFLOP/s = 2 s + 2·0.0033024 s: past the 1.5 s deadline."""
    devices = [Device("slow-link", 1.0, 1.0, 1.0), Device("fast", 2.0, 10.0, 10.0),
               Device("slow-cpu", 0.5, 10.0, 10.0)]
    clock = Clock(devices, [1e9, 1e9, 1e9], deadline=1.5)
    grid, acct, replies = _round(clock)
    assert devices[0].seconds(1e9, BYTES, BYTES) == pytest.approx(1 + 2 * 8 * BYTES / 1e6)
    assert [r.has_error() for r in replies] == [False, False, True]
    assert replies[2].error.reason == "Straggler: client 2 missed the 1.5 s deadline in round 1"
    assert clock.metrics(1) == {"virtual_s": 1.5, "virtual_time": 1.5, "stragglers": 1.0,
                                "offline": 0.0}
    assert acct.traffic[102].down == BYTES and acct.traffic[102].up == 0  # upload discarded
    assert acct.traffic[102].failed and acct.spent == 5 * BYTES
    no_deadline = Clock(devices, [1e9, 1e9, 1e9])
    _round(no_deadline)
    assert no_deadline.metrics(1)["virtual_s"] == pytest.approx(2 + 2 * 8 * BYTES / 10e6)


def test_offline_clients_are_not_sent_anything() -> None:
    devices = [Device("d", 1.0, 1.0, 1.0)] * 3
    clock = Clock(devices, [0.0] * 3, trace={(1, 1): False})
    grid, acct, replies = _round(clock)
    assert [r.metadata.src_node_id for r in replies] == [100, 102]
    assert 101 not in acct.traffic and clock.metrics(1)["offline"] == 1.0
    half = Clock([Device("d", 1.0, 1.0, 1.0, availability=0.5)] * 3, [0.0] * 3, seed=3)
    fates = [[half.online(c, r) for c in range(3)] for r in range(1, 41)]
    assert fates == [[half.online(c, r) for c in range(3)] for r in range(1, 41)]  # seeded
    assert 0.3 < np.mean(fates) < 0.7


def test_cli_devices_deadline_and_virtual_time(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq
    from cli_runs import simulate_inline

    profiles = ("[{name: phone, fraction: 0.5, gflops: 0.05, up_mbps: 5, down_mbps: 20, "
                "availability: 0.7}, {name: laptop, fraction: 0.5, gflops: 20, up_mbps: 50, "
                "down_mbps: 100}]")
    run_dir = simulate_inline(tmp_path, "rounds=3", "clients.train.epochs=1",
                              f"clients.devices.profiles={profiles}", "clients.deadline_s=3")
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [r["virtual_s"] for r in rows] == [3.0, 3.0, 3.0]  # phones miss every deadline
    assert rows[-1]["virtual_time"] == 9.0
    assert all(r["stragglers"] > 0 for r in rows) and sum(r["offline"] for r in rows) > 0
    assert all(r["stragglers"] + r["offline"] <= 5 for r in rows)  # only phones fail
    assert rows[-1]["acc"] > 0.2  # the laptops still learn
