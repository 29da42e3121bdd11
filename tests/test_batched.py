"""Batched local training (``engine.batched``) gives what one-by-one training gives.

- :func:`fedkd.batched.train_batched` against :func:`fedkd.train.train_supervised` run client
  by client: momentum, weight decay, unequal client sizes, ragged last batches, a dropped lone
  sample, an empty client, several epochs or a fixed step count, divergence;
- the engines: FedAvg in process with ``engine.batched`` on and off, faults and codecs
  included; the replies message by message (inline and on a Ray actor); BatchNorm models
  train one by one; the Flower engine refuses the setting.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from grids import run_in_process

from fedkd.batched import train_batched, unbatchable
from fedkd.client import WorldSource, seed_for, train_config_record
from fedkd.comm import state_dict_to_arrayrecord
from fedkd.compose import from_dict, load_scenario, prepare
from fedkd.engine import batching
from fedkd.engine.inline import NODE_BASE, InlineGrid
from fedkd.errors import ScenarioError
from fedkd.models import build_model
from fedkd.scenario import TrainConfig, dump
from fedkd.train import train_supervised
from fedkd.world import World, build_world

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
TOY = ["rounds=2", "clients.num=5", "clients.train.steps=4", "clients.train.batch_size=16",
       "clients.train.weight_decay=0.001", "partition.params.min_size=5", "engine.name=inline"]

SHAPE = (1, 8, 8)
#: Unequal clients: ragged last batches (37, 50), a lone leftover sample that is dropped
#: (65 = 4 * 16 + 1), a client smaller than a batch, one of a single sample, an empty one.
SIZES = [37, 50, 5, 1, 0, 65]


def _toy(arch: str) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]],
                             list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    datas = [(torch.randn(n, *SHAPE, generator=gen), torch.randint(0, 10, (n,), generator=gen))
             for n in SIZES]
    states = [build_model(arch, SHAPE, 10, seed=i).state_dict() for i in range(len(SIZES))]
    return build_model(arch, SHAPE, 10, seed=99), states, datas


def _one_by_one(arch: str, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                cfg: TrainConfig, seed: int) -> tuple[dict[str, torch.Tensor], Any]:
    model = build_model(arch, SHAPE, 10, seed=0)
    model.load_state_dict(state)
    result = train_supervised(model, x, y, cfg, seed)
    return model.state_dict(), result


@pytest.mark.parametrize("arch", ["mlp", "cnn_small"])
@pytest.mark.parametrize("cfg", [
    TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=3, batch_size=16),
    TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, steps=7, batch_size=8),
], ids=["epochs-momentum-decay", "steps-plain-sgd"])
def test_equals_train_supervised_client_by_client(arch: str, cfg: TrainConfig) -> None:
    model, states, datas = _toy(arch)
    seeds = [seed_for(0, 1, c, 0) for c in range(len(SIZES))]
    batched = train_batched(model, states, datas, cfg, seeds)
    assert len(batched) == len(SIZES)
    for c, outcome in enumerate(batched):
        assert not isinstance(outcome, Exception)
        state, result = outcome
        ref_state, ref = _one_by_one(arch, states[c], *datas[c], cfg, seeds[c])
        assert (result.steps, result.examples) == (ref.steps, ref.examples)
        assert result.loss == pytest.approx(ref.loss, abs=1e-5)
        assert list(state) == list(ref_state)
        for key, value in ref_state.items():
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0)
    assert batched[4][1].steps == 0 and batched[4][1].loss == 0.0  # the empty client
    if cfg.steps is None:
        assert batched[5][1].examples == 3 * 64  # the lone sample of each epoch is dropped


def test_in_float64_the_two_agree_to_rounding() -> None:
    """In float32 a near-tie in max-pooling or ReLU that the two summation orders break
    differently can move one client by 1e-3 on larger inputs; in float64 there is none."""
    shape = (1, 12, 12)
    gen = torch.Generator().manual_seed(1)
    datas = [(torch.randn(n, *shape, generator=gen, dtype=torch.float64),
              torch.randint(0, 10, (n,), generator=gen)) for n in (70, 33, 64)]
    model = build_model("cnn_small", shape, 10, seed=0).double()
    state = model.state_dict()
    cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-3, epochs=2, batch_size=32)
    batched = train_batched(model, [state] * 3, datas, cfg, [5, 6, 7])
    for c, (x, y) in enumerate(datas):
        ref = build_model("cnn_small", shape, 10, seed=0).double()
        ref.load_state_dict(state)
        result = train_supervised(ref, x, y, cfg, 5 + c)
        got_state, got = batched[c]  # type: ignore[misc]
        assert got.loss == pytest.approx(result.loss, abs=1e-12)
        torch.testing.assert_close(got_state, ref.state_dict(), atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_a_diverging_client_fails_alone_as_one_by_one() -> None:
    model, states, datas = _toy("mlp")
    cfg = TrainConfig(lr=0.05, momentum=0.9, epochs=2, batch_size=16)
    states[1] = {k: v * 1e30 for k, v in states[1].items()}  # overflows at the first step
    seeds = list(range(len(SIZES)))
    batched = train_batched(model, states, datas, cfg, seeds)
    with pytest.raises(FloatingPointError) as ref:
        _one_by_one("mlp", states[1], *datas[1], cfg, seeds[1])
    assert isinstance(batched[1], FloatingPointError) and str(batched[1]) == str(ref.value)
    state, result = batched[0]  # type: ignore[misc]
    ref_state, ref_result = _one_by_one("mlp", states[0], *datas[0], cfg, seeds[0])
    assert result.loss == pytest.approx(ref_result.loss, abs=1e-5)
    torch.testing.assert_close(state, ref_state, atol=1e-5, rtol=0)


def test_groups_of_any_size_give_each_client_the_same_update() -> None:
    model, states, datas = _toy("mlp")
    cfg = TrainConfig(lr=0.1, momentum=0.9, epochs=2, batch_size=4)
    seeds = list(range(len(SIZES)))
    whole = train_batched(model, states, datas, cfg, seeds)  # CPU: groups of CPU_GROUP
    for group in (1, 2, len(SIZES)):
        parts = train_batched(model, states, datas, cfg, seeds, group=group)
        assert len(parts) == len(whole)
        for a, b in zip(whole, parts, strict=True):
            assert not isinstance(a, Exception) and not isinstance(b, Exception)
            assert a[1].steps == b[1].steps and a[1].examples == b[1].examples
            assert a[1].loss == pytest.approx(b[1].loss, abs=1e-6)
            torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


def test_models_with_batchnorm_dropout_or_buffers_are_refused() -> None:
    assert unbatchable(build_model("mlp", SHAPE, 10, seed=0)) is None
    assert unbatchable(build_model("cnn_small", SHAPE, 10, seed=0)) is None
    assert "BatchNorm" in str(unbatchable(build_model("cnn_medium", SHAPE, 10, seed=0)))
    assert "dropout" in str(unbatchable(torch.nn.Sequential(torch.nn.Dropout(0.5))))
    with_buffer = torch.nn.Linear(2, 2)
    with_buffer.register_buffer("scale", torch.ones(1))
    assert "buffer 'scale'" in str(unbatchable(with_buffer))
    model, states, datas = _toy("mlp")
    with pytest.raises(ValueError, match="BatchNorm"):
        train_batched(build_model("cnn_medium", SHAPE, 10, seed=0), states, datas,
                      TrainConfig(), list(range(len(SIZES))))


# ------------------------------------------------------------------------------ engines


def _world(*overrides: str) -> World:
    return build_world(load_scenario(QUICKSTART, [*TOY, *overrides]))


def _rounds(results: list[Any]) -> list[tuple[float, float, int]]:
    return [(float(r.eval_metrics["acc"]), float(r.train_metrics["train-loss"]),
             sum(1 for t in r.traffic.values() if t.failed)) for r in results]


@pytest.mark.parametrize("overrides", [
    ["clients.models.0.arch=mlp"],
    ["clients.models.0.arch=cnn_small"],
    ["clients.models.0.arch=mlp", "clients.dropout=0.2", "clients.crash=0.2",
     "comm.up.codec=fp16", "comm.down.codec=fp16"],
], ids=["mlp", "cnn_small", "mlp-faults-fp16"])
def test_fedavg_in_process_batched_equals_one_by_one(overrides: list[str],
                                                     tmp_path: Path) -> None:
    one = _rounds(run_in_process(_world(*overrides, "engine.batched=false"), tmp_path / "a"))
    many = _rounds(run_in_process(_world(*overrides, "engine.batched=true"), tmp_path / "b"))
    assert len(one) == len(many) == 2
    for (acc, loss, failures), (acc_b, loss_b, failures_b) in zip(one, many, strict=True):
        assert acc_b == pytest.approx(acc, abs=1e-4)
        assert loss_b == pytest.approx(loss, abs=1e-5)
        assert failures_b == failures


def _train_messages(world: World, cids: list[int]) -> list[Message]:
    """FedAvg's train messages of round 1 for ``cids`` (one shared content), plus a query."""
    arch = world.groups[0]
    arrays = state_dict_to_arrayrecord(world.new_model(arch, seed=3).state_dict())
    config = train_config_record(world.scenario.clients.train, world.scenario.seed)
    config = ConfigRecord({**dict(config), "server-round": 1})
    content = RecordDict({"arrays": arrays, "config": config})
    msgs = [Message(content, dst_node_id=NODE_BASE + c, message_type="train", group_id="1")
            for c in cids]
    hello = Message(RecordDict({"config": ConfigRecord({"seed": 0})}),
                    dst_node_id=NODE_BASE + cids[0], message_type="query.hello")
    return [msgs[0], hello, *msgs[1:]]


def _assert_same_replies(got: list[Message], want: list[Message]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.metadata.src_node_id == b.metadata.src_node_id
        assert a.has_error() == b.has_error()
        assert sorted(a.content.keys()) == sorted(b.content.keys())
        for name, record in b.content.metric_records.items():
            got = a.content.metric_records[name]
            assert list(got) == list(record)
            for key, value in record.items():
                assert got[key] == (pytest.approx(value, abs=1e-5) if isinstance(value, float)
                                    else value)
        for name, record in b.content.array_records.items():
            assert list(a.content.array_records[name]) == list(record)
            for key, arr in record.items():
                got_arr = a.content.array_records[name][key].numpy()
                assert got_arr.dtype == arr.numpy().dtype
                torch.testing.assert_close(torch.from_numpy(got_arr),
                                           torch.from_numpy(arr.numpy()), atol=1e-5, rtol=0)


def _replies(world: World, run_dir: Path, cids: list[int]) -> list[Message]:
    grid = InlineGrid(world, WorldSource(dump(world.scenario), str(run_dir)))
    return list(grid.send_and_receive(_train_messages(world, cids)))


def test_inline_replies_match_message_by_message(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cids = [0, 2, 3, 4]
    want = _replies(_world("clients.models.0.arch=mlp"), tmp_path / "a", cids)
    calls: list[int] = []

    def spy(model: torch.nn.Module, states: list[Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(states))
        return train_batched(model, states, *args, **kwargs)

    monkeypatch.setattr(batching, "train_batched", spy)
    got = _replies(_world("clients.models.0.arch=mlp", "engine.batched=true"), tmp_path / "b",
                   cids)
    assert calls == [4]  # one call for the four train messages; the query went the usual way
    _assert_same_replies(got, want)


def test_batchnorm_models_train_one_by_one(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    overrides = ["clients.models.0.arch=cnn_medium", "rounds=1"]
    one = _rounds(run_in_process(_world(*overrides), tmp_path / "a"))
    with caplog.at_level(logging.WARNING, logger="fedkd"):
        many = _rounds(run_in_process(_world(*overrides, "engine.batched=true"),
                                      tmp_path / "b"))
    assert many == one  # the very same computation
    assert "cnn_medium trains one client at a time (BatchNorm layer" in caplog.text


def test_flower_engine_refuses_batched() -> None:
    scn = from_dict({"engine": {"name": "flower", "batched": True}})
    with pytest.raises(ScenarioError, match=r"^engine\.batched: got True; allowed: false unless"):
        prepare(scn)


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    from fedkd.engine.simulate import single_node_ray

    with single_node_ray():
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        try:
            yield
        finally:
            ray.shutdown()


def test_ray_actor_trains_its_batch_batched(ray_session: None, tmp_path: Path) -> None:
    from fedkd.engine.ray_grid import RayGrid

    cids = [0, 1, 3]
    overrides = ["clients.models.0.arch=mlp", "engine.name=ray"]
    want = _replies(_world("clients.models.0.arch=mlp"), tmp_path / "a", cids)
    world = _world(*overrides, "engine.batched=true")
    grid = RayGrid(world, WorldSource(dump(world.scenario), str(tmp_path / "b")), actors=1)
    try:
        got = list(grid.send_and_receive(_train_messages(world, cids)))
    finally:
        grid.shutdown()
    _assert_same_replies(got, want)
