"""FedProto: the prototype loss and the uploaded prototypes pinned on a client step; λ = 0 is
training alone; latent widths must agree; the upload is exactly one C x d prototype record."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, Message, RecordDict
from test_fd import QUICKSTART, ROOT, SMALL, run_fd

from fedkd.client import ClientEnv, train_config_record
from fedkd.compose import build_strategy, load_scenario
from fedkd.errors import ScenarioError
from fedkd.models import build_model
from fedkd.state import StateStore
from fedkd.train import batch_indices
from fedkd.world import World, build_world
from strategies import get_strategy
from strategies.fd import class_mse, class_record
from strategies.fedproto import TRAIN_TYPE, FedProto, check_latent_dims, train_fedproto
from strategies.local import train_local

#: cnn_small next to an mlp whose last hidden layer has cnn_small's 128 latent units
SAME_LATENT = ("clients.models=[{arch: cnn_small, fraction: 0.5}, "
               "{arch: mlp, fraction: 0.5, params: {hidden: [128]}}]")
#: one upload for 10 classes and d = 128: a 10 x 128 float32 .npy (128-byte header + 5120
#: bytes) and a 10-entry int64 .npy (128 + 80)
PROTO_BYTES = 128 + 10 * 128 * 4 + 128 + 10 * 8


pytestmark = pytest.mark.usefixtures("one_thread")


def test_prototype_distance_by_hand() -> None:
    """Row 0 (class 0) against prototype 0: 1 + 4 + 9; row 1 (class 1, no global prototype)
    adds 0; mean over the 2 x 3 entries: 14 / 6 (nn.MSELoss as the reference)."""
    feats = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 4.0]], requires_grad=True)
    protos = torch.zeros(2, 3)
    loss = class_mse(feats, protos, torch.tensor([True, False]), torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(14 / 6)
    loss.backward()
    assert feats.grad is not None and feats.grad[1].tolist() == [0.0, 0.0, 0.0]


def test_latent_dims_must_agree() -> None:
    assert check_latent_dims({"cnn_small": 128, "mlp": 128}) == 128
    with pytest.raises(ScenarioError) as err:
        check_latent_dims({"cnn_small": 128, "mlp": 200})
    assert err.value.path == "clients.models"
    world = SimpleNamespace(groups=("cnn_small", "resnet8"),
                            new_model=lambda arch, seed: build_model(arch, (1, 8, 8), 10, seed))
    with pytest.raises(ScenarioError, match="clients.models"):
        FedProto().bind(world)  # type: ignore[arg-type]


def test_a_scenario_with_different_latent_widths_is_rejected() -> None:
    hetero = "clients.models=[{arch: cnn_small, fraction: 0.5}, {arch: mlp, fraction: 0.5}]"
    scn = load_scenario(QUICKSTART, ["strategy.name=fedproto", hetero])
    with pytest.raises(ScenarioError, match="clients.models") as err:
        build_strategy(scn, build_world(scn))
    assert err.value.value == {"cnn_small": 128, "mlp": 200}


def test_bad_params_name_the_key() -> None:
    cls = get_strategy("fedproto")
    with pytest.raises(ScenarioError, match="strategy.params.lamda"):
        cls(lamda=-1.0)
    with pytest.raises(ScenarioError, match="strategy.params.class_weights"):
        cls(class_weights="samples")
    assert cls().lamda == 1.0 and cls().class_weights == "uniform"


# ----------------------------------------------------------------------------- client side
@pytest.fixture(scope="module")
def world() -> World:
    return build_world(load_scenario(QUICKSTART))


def client_env(world: World, store: Path, extra: dict) -> ClientEnv:
    cfg = {**dict(train_config_record(world.scenario.clients.train, 0)), "server-round": 2,
           "epochs": 1, **extra}
    return ClientEnv(cid=3, world=world, store=StateStore(store), config=ConfigRecord(cfg))


def proto_message(env: ClientEnv, protos: torch.Tensor | None) -> Message:
    content = RecordDict({"config": env.config})
    if protos is not None:
        content["protos"] = class_record(protos.numpy(), np.ones(len(protos)), "protos")
    return Message(content, dst_node_id=1, message_type=TRAIN_TYPE)


def private_state(env: ClientEnv) -> dict[str, np.ndarray]:
    model, existed = env.private_model()
    assert existed
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_lamda_zero_is_training_alone_and_lamda_changes_it(world: World, tmp_path: Path) -> None:
    protos = torch.randn(10, 128, generator=torch.Generator().manual_seed(0))
    alone = client_env(world, tmp_path / "a", {})
    train_local(Message(RecordDict({"config": alone.config}), dst_node_id=1,
                        message_type="train.local"), alone)
    off = client_env(world, tmp_path / "b", {"proto-lamda": 0.0})
    reply = train_fedproto(proto_message(off, protos), off)
    on = client_env(world, tmp_path / "c", {"proto-lamda": 1.0})
    train_fedproto(proto_message(on, protos), on)
    a, b, c = private_state(alone), private_state(off), private_state(on)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.allclose(a[k], c[k]) for k in a)
    up = reply["protos"]
    assert up["protos"].numpy().shape == (10, 128)
    assert up["counts"].numpy().tolist() == world.counts[3].tolist()


def test_one_step_loss_and_uploaded_prototypes(world: World, tmp_path: Path) -> None:
    """One SGD step: the reported loss is CE + λ·MSE(features, prototype[y]) of the fresh model
    on the first batch, and the upload holds that batch's per-class mean features."""
    env = client_env(world, tmp_path, {"proto-lamda": 0.5, "steps": 1})
    protos = torch.randn(10, 128, generator=torch.Generator().manual_seed(1))
    protos[4] = 0.0
    has = torch.ones(10, dtype=torch.bool)
    has[4] = False
    model, _ = env.private_model()
    gen = torch.Generator().manual_seed(env.seed())
    (idx,) = batch_indices(len(env.data), env.train_config.batch_size, gen, steps=1)
    x, y = env.data.x[idx], env.data.y[idx]
    with torch.no_grad():
        feats = model.features(x)
        want = F.cross_entropy(model.head(feats), y) + 0.5 * class_mse(feats, protos, has, y)
    msg = proto_message(env, protos)
    msg.content["protos"] = class_record(protos.numpy(), has.long().numpy(), "protos")
    reply = train_fedproto(msg, env)
    assert reply["metrics"]["train-loss"] == pytest.approx(float(want), rel=1e-5)
    up = reply["protos"]
    counts = up["counts"].numpy()
    for c in range(10):
        rows = feats[y == c]
        if len(rows):
            assert counts[c] == world.counts[3][c]
            assert up["protos"].numpy()[c] == pytest.approx(rows.mean(0).numpy(), abs=1e-5)
        else:
            assert counts[c] == 0


# ----------------------------------------------------------------------------- end to end
def test_lamda_zero_run_equals_local_and_prototypes_cross_the_network(tmp_path: Path) -> None:
    local = run_fd(tmp_path / "local", ["strategy.name=local"])
    off = run_fd(tmp_path / "off", ["strategy.name=fedproto", "strategy.params.lamda=0"])
    proto = run_fd(tmp_path / "proto", ["strategy.name=fedproto"])
    assert [r.eval_metrics["acc"] for r in off] == [r.eval_metrics["acc"] for r in local]
    assert proto[1].eval_metrics["acc"] != local[1].eval_metrics["acc"]
    assert [t.down for t in proto[0].traffic.values()] == [0] * 4  # round 1: nothing to send
    for r in proto:
        assert [t.up for t in r.traffic.values()] == [PROTO_BYTES] * 4
    assert [t.down for t in proto[1].traffic.values()] == [PROTO_BYTES] * 4
    assert proto[1].train_metrics["proto-loss"] > 0


@pytest.mark.slow  # the contract test runs every strategy in process
def test_cli_heterogeneous_models_with_one_latent_width(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART), "--out", str(tmp_path),
         "--no-progress", "--set", "strategy.name=fedproto", "--set", SAME_LATENT,
         *[a for s in SMALL for a in ("--set", s)]],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [(r["bytes_down"], r["bytes_up"]) for r in rows] == [
        (0, 4 * PROTO_BYTES), (4 * PROTO_BYTES, 4 * PROTO_BYTES)]
    assert all(r["failures"] == 0 and 0.0 <= r["acc"] <= 1.0 for r in rows)
    clients = pq.read_table(run / "clients.parquet").to_pylist()
    assert {c["arch"] for c in clients} == {"cnn_small", "mlp"}
    assert {c["bytes_up"] for c in clients} == {PROTO_BYTES}
