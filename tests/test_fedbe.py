"""FedBE (Chen & Chao ICLR 2021): Gaussian sampling and sharpening pinned by hand, the SWA
rule, the loss convention, the ensemble order, the FedAvg off-switch and a CLI run."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedkd.comm import arrayrecord_to_state_dict, split_groups, state_dict_to_arrayrecord
from fedkd.compose import load_scenario
from fedkd.errors import ScenarioError
from fedkd.train import train_supervised
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.fedavg import NodeInfo, weighted_average
from strategies.fedbe import AveragedSGD, FedBE, gaussian_samples, sharpen, swa_distill
from strategies.feddf import distill_loss

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
HETERO = "clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.5}]"


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- pure parts


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_reference_gaussian_over_normalised_updates_by_hand() -> None:
    """Updates (3, 4) and (0, 2) from w0 = 0: directions (0.6, 0.8) and (0, 1), norms 5 and 2.
    mu = (0.3, 0.9), E[d²] = (0.18, 0.82), var = (0.09, 0.01), mean norm r = 3.5."""
    base = {"w": _t(0, 0), "n": torch.tensor(7)}
    clients = [{"w": _t(3, 4), "n": torch.tensor(1)}, {"w": _t(0, 2), "n": torch.tensor(2)}]
    fedavg = {"w": _t(1, 3), "n": torch.tensor(3)}
    (mean,) = gaussian_samples(base, fedavg, clients, [1, 1], 1, 0.0, torch.Generator())
    torch.testing.assert_close(mean["w"], _t(1.05, 3.15))  # w0 + r * mu
    assert mean["n"].item() == 3 and mean["n"].dtype == torch.int64  # integers from FedAvg
    eps = torch.randn(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (s,) = gaussian_samples(base, fedavg, clients, [1, 1], 1, 1.0,
                            torch.Generator().manual_seed(4))
    expected = 3.5 * (torch.tensor([0.3, 0.9], dtype=torch.float64)
                      + torch.tensor([0.3, 0.1], dtype=torch.float64) * eps)
    torch.testing.assert_close(s["w"], expected.float())
    # one direction only: the variance is floored at 1e-5, as the reference's clamp
    same = [{"w": _t(3, 4), "n": torch.tensor(0)}, {"w": _t(6, 8), "n": torch.tensor(0)}]
    (s,) = gaussian_samples(base, fedavg, same, [1, 1], 1, 1.0, torch.Generator().manual_seed(4))
    floor = math.sqrt(1e-5)
    torch.testing.assert_close(s["w"], (7.5 * (torch.tensor([0.6, 0.8], dtype=torch.float64)
                                               + floor * eps)).float())


def test_weights_gaussian_is_the_data_weighted_mean_and_variance() -> None:
    """Clients (1, 2) and (3, 6) with 1 and 3 examples: mu = (2.5, 5), var = (0.75, 3)."""
    clients = [{"w": _t(1, 2)}, {"w": _t(3, 6)}]
    fedavg = {"w": _t(2.5, 5)}
    (m,) = gaussian_samples(fedavg, fedavg, clients, [1, 3], 1, 0.0, torch.Generator(), "weights")
    torch.testing.assert_close(m["w"], _t(2.5, 5))
    eps = torch.randn(2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (s,) = gaussian_samples(fedavg, fedavg, clients, [1, 3], 1, 0.5,
                            torch.Generator().manual_seed(1), "weights")
    sd = torch.tensor([math.sqrt(0.75), math.sqrt(3.0)], dtype=torch.float64)
    torch.testing.assert_close(s["w"], (torch.tensor([2.5, 5.0], dtype=torch.float64)
                                        + 0.5 * sd * eps).float())
    # seeded: the same generator seed gives the same samples, in draw order
    a = gaussian_samples(fedavg, fedavg, clients, [1, 3], 3, 1.0, torch.Generator().manual_seed(2))
    b = gaussian_samples(fedavg, fedavg, clients, [1, 3], 3, 1.0, torch.Generator().manual_seed(2))
    assert all(torch.equal(x["w"], y["w"]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0]["w"], a[1]["w"])


def test_sharpen_by_hand() -> None:
    # (0.6, 0.4) at t = 0.5: (0.36, 0.16) / 0.52
    torch.testing.assert_close(sharpen(_t(0.6, 0.4)[None], 0.5), _t(0.36 / 0.52, 0.16 / 0.52)[None])
    p = _t(0.2, 0.3, 0.5)[None]
    assert torch.equal(sharpen(p, 1.0), p)


def test_loss_is_kl_batchmean_c_times_the_reference() -> None:
    target = _t(0.36 / 0.52, 0.16 / 0.52)[None]
    student = torch.zeros(1, 2)  # uniform
    kl = sum(t * math.log(t / 0.5) for t in target[0].tolist())  # 0.1095
    loss = distill_loss("probs", 1.0)(student, target).item()
    assert loss == pytest.approx(kl, rel=1e-6)
    # the reference's (P * (P.log() - Q.log())).mean() averages over the C classes too
    reference = (target * (target.log() - torch.softmax(student, 1).log())).mean().item()
    assert loss == pytest.approx(2 * reference, rel=1e-6)


def test_averaged_sgd_follows_the_reference_swa_rule() -> None:
    """Gradient 1, lr 1: p = -n after step n. Averages join after steps n > start with
    n % freq == 0."""

    def run(start: int | None, freq: int, steps: int = 6) -> tuple[float, int]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = AveragedSGD([p], lr=1.0, momentum=0.0, weight_decay=0.0, start=start, freq=freq)
        for _ in range(steps):
            opt.zero_grad()
            p.sum().backward()
            opt.step()
        averaged = opt.swap()
        return p.item(), averaged

    assert run(2, 2) == (-5.0, 2)  # mean of steps 4 and 6
    assert run(0, 1) == (-3.5, 6)  # every step: mean of -1..-6
    assert run(6, 1) == (-6.0, 0)  # never past the start: the last iterate
    assert run(None, 1) == (-6.0, 0)  # SWA off


def test_swa_distill_counts_steps_and_averages() -> None:
    student = torch.nn.Linear(3, 2)
    x, targets = torch.randn(20, 3), torch.softmax(torch.randn(20, 2), 1)
    loss = distill_loss("probs", 1.0)
    assert swa_distill(student, x, targets, loss, steps=12, batch_size=8, lr=0.1, seed=0,
                       swa_start=4, swa_freq=4) == (12, 2)  # steps 8 and 12
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert swa_distill(student, x, targets, loss, steps=0, batch_size=8, lr=0.1, seed=0,
                       swa_start=0, swa_freq=1) == (0, 0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_bad_params_name_the_key() -> None:
    for params, key in (({"num_samples": -1}, "num_samples"), ({"gaussian": "dir"}, "gaussian"),
                        ({"var_scale": -0.1}, "var_scale"), ({"sharpen": 0}, "sharpen"),
                        ({"distill_steps": -1}, "distill_steps"),
                        ({"distill_lr": 0}, "distill_lr"), ({"swa_freq": 0}, "swa_freq")):
        with pytest.raises(ScenarioError) as err:
            FedBE(**params)  # type: ignore[arg-type]
        assert err.value.path == f"strategy.params.{key}"
    assert get_strategy("fedbe") is FedBE


def test_bind_needs_one_architecture_and_a_proxy_split() -> None:
    with pytest.raises(ScenarioError) as err:
        FedBE().bind(build_world(load_scenario(QUICKSTART, [HETERO])))
    assert err.value.path == "clients.models"
    with pytest.raises(ScenarioError) as err:
        FedBE().bind(build_world(load_scenario(QUICKSTART, ["data.public.fraction=0.0"])))
    assert err.value.path == "data.public.fraction"


# ----------------------------------------------------------------------------- server side


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


def _reply(node_id: int, state: dict[str, torch.Tensor], n: int) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                   dst_node_id=node_id, message_type="train")
    return Message(RecordDict({"arrays": state_dict_to_arrayrecord(state),
                               "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}),
                   reply_to=sent)


def _setup(world: World, clients: int = 4, **params: object) -> tuple[FedBE, list[Message]]:
    """A bound FedBE with handshake info and one locally trained reply per client."""
    strategy = FedBE(seed=3, **params)  # type: ignore[arg-type]
    strategy.bind(world)
    strategy.nodes = [NodeInfo(100 + cid, cid, world.archs[cid], len(world.parts[cid]),
                               tuple(int(c) for c in world.counts[cid]))
                      for cid in range(world.num_clients)]
    strategy.current = split_groups(strategy.initial_arrays(world))
    cfg = dataclasses.replace(world.scenario.clients.train, epochs=2)
    replies = []
    for cid in range(clients):
        model = world.new_model("cnn_small", seed=0)
        model.load_state_dict(arrayrecord_to_state_dict(strategy.current["cnn_small"]))
        data = world.client_data(cid)
        train_supervised(model, data.x, data.y, cfg, seed=cid)
        replies.append(_reply(100 + cid, model.state_dict(), len(data)))
    return strategy, replies


def test_off_switch_is_fedavg_exact(world: World) -> None:
    strategy, replies = _setup(world, num_samples=0, use_clients=False, distill_steps=0)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    expected = weighted_average([r.content.array_records["arrays"] for r in replies],
                                [len(world.parts[c]) for c in range(4)])
    out = split_groups(arrays)["cnn_small"]
    assert list(out) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(out[key].numpy(), expected[key].numpy())
    assert "distill-steps" not in metrics


def test_ensemble_is_fedavg_samples_clients_seeded_by_round(world: World) -> None:
    strategy, replies = _setup(world, num_samples=3)
    fedavg = strategy.aggregate_groups(replies)["cnn_small"]
    ens = strategy.teachers(1, "cnn_small", fedavg, replies)
    assert [t.cid for t in ens.teachers] == [-1, -1, -1, -1, 0, 1, 2, 3]
    avg = arrayrecord_to_state_dict(fedavg)
    assert all(torch.equal(ens.teachers[0].state[k], v) for k, v in avg.items())
    client0 = arrayrecord_to_state_dict(replies[0].content.array_records["arrays"])
    assert all(torch.equal(ens.teachers[4].state[k], v) for k, v in client0.items())
    again = strategy.teachers(1, "cnn_small", fedavg, replies).teachers
    later = strategy.teachers(2, "cnn_small", fedavg, replies).teachers
    key = "fc.1.weight"
    assert torch.equal(again[1].state[key], ens.teachers[1].state[key])
    assert not torch.equal(later[1].state[key], ens.teachers[1].state[key])
    assert not torch.equal(ens.teachers[1].state[key], ens.teachers[2].state[key])
    alone = FedBE(seed=3, num_samples=2, use_clients=False)
    alone.bind(world)
    alone.nodes, alone.current = strategy.nodes, strategy.current
    assert len(alone.teachers(1, "cnn_small", fedavg, replies)) == 3


def test_fuse_distils_with_swa_and_records(world: World) -> None:
    params = {"num_samples": 2, "distill_steps": 30, "swa_start": 10, "swa_freq": 10}
    strategy, replies = _setup(world, **params)  # type: ignore[arg-type]
    fedavg = strategy.aggregate_groups(replies)["cnn_small"]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert metrics["teachers"] == 1 + 2 + 4 and metrics["swa-models"] == 2  # steps 20, 30
    assert metrics["distill-steps"] == 30 and metrics["train-loss"] == 1.0
    assert 0.0 <= metrics["val-acc-ensemble"] <= 1.0
    out = split_groups(arrays)["cnn_small"]
    assert any(not np.array_equal(out[k].numpy(), fedavg[k].numpy()) for k in fedavg)
    again, _ = _setup(world, **params)[0].aggregate_train(1, replies)  # type: ignore[arg-type]
    assert again is not None
    for key in arrays:
        np.testing.assert_array_equal(arrays[key].numpy(), again[key].numpy())
    no_swa, m = _setup(world, swa=False, **params)[0].aggregate_train(1, replies)  # type: ignore
    assert m is not None and m["swa-models"] == 0 and no_swa is not None
    assert any(not np.array_equal(no_swa[k].numpy(), arrays[k].numpy()) for k in arrays)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow  # the contract test runs every strategy in process
def test_cli_fedbe_two_rounds(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART), "--out", str(tmp_path),
         "--no-progress", "--set", "strategy.name=fedbe", "--set", "rounds=2",
         "--set", "strategy.params.distill_steps=40", "--set", "strategy.params.swa_start=20",
         "--set", "strategy.params.swa_freq=10"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[-1]["acc"] > 0.2  # well above chance after two rounds
    for r in rows:
        # FedBE adds no traffic to FedAvg: one cnn_small model each way per client and round
        assert r["bytes_down"] == r["bytes_up"] and r["participants"] == 10
        assert r["teachers"] == 21 and r["swa_models"] == 2 and r["distill_steps"] == 40
