"""FedGKD: the teacher is the average of the last global models; γ = 0 is FedAvg's client."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from grids import PlainGrid

from fedkd.client import ClientEnv, train, train_config_record
from fedkd.comm import state_dict_to_arrayrecord
from fedkd.compose import load_scenario
from fedkd.errors import ScenarioError
from fedkd.state import StateStore
from fedkd.world import World, build_world
from strategies.fedgkd import TRAIN_TYPE, FedGKD, train_gkd

QUICKSTART = Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml"


def _model(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, np.float32))})


def test_teacher_is_the_mean_of_the_last_m_global_models() -> None:
    strategy = FedGKD(fraction_train=1.0, min_available_nodes=2, buffer_length=2, gamma=0.5)
    grid = PlainGrid([7, 8])
    first = list(strategy.configure_train(1, _model(1.0), ConfigRecord(), grid))
    assert [m.metadata.message_type for m in first] == [TRAIN_TYPE] * 2
    assert "teacher" not in first[0].content  # round 1: nothing to distil yet
    assert first[0].content["config"]["gkd-gamma"] == 0.0
    second = list(strategy.configure_train(2, _model(3.0), ConfigRecord(), grid))
    assert second[0].content["teacher"]["w"].numpy().tolist() == [2.0, 2.0, 2.0]  # (1 + 3) / 2
    assert second[0].content["config"]["gkd-gamma"] == 0.5
    third = list(strategy.configure_train(3, _model(7.0), ConfigRecord(), grid))
    assert third[0].content["teacher"]["w"].numpy().tolist() == [5.0, 5.0, 5.0]  # (3 + 7) / 2
    one = FedGKD(fraction_train=1.0, min_available_nodes=2, buffer_length=1)
    list(one.configure_train(1, _model(1.0), ConfigRecord(), grid))
    assert "teacher" not in next(iter(one.configure_train(2, _model(3.0), ConfigRecord(),
                                                          grid))).content


def test_bad_params_name_the_key() -> None:
    with pytest.raises(ScenarioError, match="strategy.params.buffer_length"):
        FedGKD(buffer_length=0)
    with pytest.raises(ScenarioError, match="strategy.params.gamma"):
        FedGKD(gamma=-0.1)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


def _update(world: World, tmp_path: Path, gamma: float | None,
            teacher_seed: int | None = None) -> dict:
    model = world.new_model(world.archs[1], seed=3)
    cfg = {**dict(train_config_record(world.scenario.clients.train, 0)), "server-round": 2}
    records = {"arrays": state_dict_to_arrayrecord(model.state_dict())}
    if gamma is not None:
        cfg.update({"gkd-gamma": gamma, "gkd-temperature": 1.0})
    if teacher_seed is not None:
        records["teacher"] = state_dict_to_arrayrecord(
            world.new_model(world.archs[1], seed=teacher_seed).state_dict())
    env = ClientEnv(cid=1, world=world, store=StateStore(tmp_path / "s"), config=ConfigRecord(cfg))
    msg = Message(RecordDict({**records, "config": env.config}), dst_node_id=1,
                  message_type=TRAIN_TYPE if gamma is not None else "train")
    out = (train_gkd if gamma is not None else train)(msg, env)["arrays"]
    return {k: a.numpy().copy() for k, a in out.items()}


def test_gamma_zero_is_fedavg_and_the_teacher_matters(world: World, tmp_path: Path) -> None:
    fedavg = _update(world, tmp_path, None)
    assert all(np.array_equal(fedavg[k], v) for k, v in _update(world, tmp_path, 0.0).items())
    self_taught = _update(world, tmp_path, 1.0)
    other = _update(world, tmp_path, 1.0, teacher_seed=11)
    assert any(not np.allclose(fedavg[k], self_taught[k]) for k in fedavg)
    assert any(not np.allclose(self_taught[k], other[k]) for k in fedavg)


def test_cli_teacher_doubles_the_download(tmp_path: Path) -> None:
    import subprocess
    import sys

    import pyarrow.parquet as pq

    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART), "--out", str(tmp_path),
         "--no-progress", "--set", "rounds=2", "--set", "strategy.name=fedgkd",
         "--set", "engine.name=inline",
         "--set", "strategy.params.buffer_length=2", "--set", "clients.train.epochs=1",
         "--set", "clients.num=4"],
        capture_output=True, text=True, timeout=600, cwd=QUICKSTART.parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert rows[1]["bytes_down"] == 2 * rows[0]["bytes_down"] == 2 * rows[1]["bytes_up"]
    assert rows[-1]["acc"] > 0.2
