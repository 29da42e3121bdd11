"""FedNTD: the not-true distillation loss pinned on toy logits; β = 0 is FedAvg's client."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedkd.client import ClientEnv, train, train_config_record
from fedkd.comm import state_dict_to_arrayrecord
from fedkd.compose import load_scenario
from fedkd.distill import not_true_kl, not_true_logits
from fedkd.errors import ScenarioError
from fedkd.state import StateStore
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.fedntd import TRAIN_TYPE, train_ntd

QUICKSTART = Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml"


def test_not_true_logits_drop_the_true_class() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    assert not_true_logits(logits, torch.tensor([0, 2])).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_not_true_kl_by_hand() -> None:
    """Target 0: the student's not-true logits (1, 2) against the teacher's (0, 0):
    KL = ½ ln(½ / σ₁) + ½ ln(½ / σ₂) with σ = softmax(1, 2)."""
    student = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)
    s1, s2 = 1 / (1 + math.e), math.e / (1 + math.e)
    expected = 0.5 * math.log(0.5 / s1) + 0.5 * math.log(0.5 / s2)
    loss = not_true_kl(student, teacher, torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)  # 0.120115
    loss.backward()
    assert teacher.grad is None  # the global model is a frozen teacher
    assert student.grad is not None and student.grad[0, 0].item() == 0.0  # true class untouched
    # temperature softens both sides, with no T² factor (the reference's convention)
    t = 2.0
    a, b = 1 / (1 + math.exp(0.5)), math.exp(0.5) / (1 + math.exp(0.5))
    soft = 0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / b)
    assert not_true_kl(student, teacher, torch.tensor([0]), t).item() == pytest.approx(soft)
    # a teacher that agrees on the not-true classes costs nothing, whatever its true logit
    agree = torch.tensor([[-9.0, 1.0, 2.0]])
    assert not_true_kl(student, agree, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-7)


def test_bad_params_name_the_key() -> None:
    cls = get_strategy("fedntd")
    with pytest.raises(ScenarioError, match="strategy.params.beta"):
        cls(beta=-1)
    with pytest.raises(ScenarioError, match="strategy.params.tau"):
        cls(tau=0)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


def _client_update(world: World, tmp_path: Path, beta: float | None) -> dict:
    torch.manual_seed(0)
    model = world.new_model(world.archs[2], seed=3)
    cfg = {**dict(train_config_record(world.scenario.clients.train, 0)), "server-round": 1}
    kind = "train"
    if beta is not None:
        cfg.update({"ntd-beta": beta, "ntd-tau": 1.0})
        kind = TRAIN_TYPE
    env = ClientEnv(cid=2, world=world, store=StateStore(tmp_path / "state"),
                    config=ConfigRecord(cfg))
    msg = Message(RecordDict({"arrays": state_dict_to_arrayrecord(model.state_dict()),
                              "config": env.config}), dst_node_id=1, message_type=kind)
    handler = train_ntd if beta is not None else train
    arrays = handler(msg, env)["arrays"]
    return {k: a.numpy().copy() for k, a in arrays.items()}


def test_beta_zero_is_the_fedavg_client_and_beta_changes_it(world: World,
                                                            tmp_path: Path) -> None:
    fedavg = _client_update(world, tmp_path, None)
    off = _client_update(world, tmp_path, 0.0)
    on = _client_update(world, tmp_path, 1.0)
    assert all(np.array_equal(fedavg[k], off[k]) for k in fedavg)
    assert any(not np.allclose(fedavg[k], on[k]) for k in fedavg)


def test_cli_two_rounds(tmp_path: Path) -> None:
    import subprocess
    import sys

    import pyarrow.parquet as pq

    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART), "--out", str(tmp_path),
         "--no-progress", "--set", "rounds=2", "--set", "strategy.name=fedntd",
         "--set", "engine.name=inline",
         "--set", "clients.train.epochs=1", "--set", "clients.num=4"],
        capture_output=True, text=True, timeout=600, cwd=QUICKSTART.parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert len(rows) == 2 and rows[-1]["acc"] > 0.2
    assert rows[0]["bytes_down"] == rows[0]["bytes_up"] > 0  # weights both ways, as FedAvg
