"""The engine: Flower task identity, actor load balancing, byte accounting, RayGrid."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from grids import ToyGrid

from fedkd.client import WorldSource
from fedkd.compose import from_dict
from fedkd.engine.ray_grid import (
    NODE_BASE,
    SERVER_NODE_ID,
    SMALL_BATCH_BYTES,
    RayGrid,
    balance,
    pack,
    set_task_identity,
    unpack,
)
from fedkd.engine.runner import AccountingGrid
from fedkd.scenario import dump
from fedkd.world import build_world


def test_flower_message_needs_task_identity() -> None:
    """Flower builds instruction messages from its process task identity; fedkd sets it.

    If a Flower upgrade renames or moves this, every engine breaks: this test says so first.
    """
    set_task_identity(SERVER_NODE_ID)
    msg = Message(RecordDict(), dst_node_id=NODE_BASE + 3, message_type="query.ping")
    assert TaskIdentity.node_id == SERVER_NODE_ID
    assert msg.metadata.src_node_id == SERVER_NODE_ID
    assert msg.metadata.dst_node_id == NODE_BASE + 3
    reply = Message(RecordDict(), reply_to=msg)
    assert reply.metadata.src_node_id == NODE_BASE + 3
    assert reply.metadata.dst_node_id == SERVER_NODE_ID


def test_balance_longest_processing_time_first() -> None:
    plan = balance([5, 1, 4, 2, 3], 2)
    assert plan == [[0, 1, 3], [2, 4]]
    loads = [sum([5, 1, 4, 2, 3][i] for i in b) for b in plan]
    assert sorted(loads) == [7, 8]
    assert balance([1, 1, 1], 5) == [[0], [1], [2], [], []]


class EchoGrid(ToyGrid):
    """A toy grid that replies to each message in reverse order with a fixed payload."""

    def __init__(self, reply_array: np.ndarray) -> None:
        self.reply_array = reply_array
        self.node_ids = [1, 2, 3]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        content = RecordDict({"arrays": ArrayRecord({"r": Array(self.reply_array)})})
        return [Message(content, reply_to=m) for m in reversed(list(messages))]


def test_small_batches_cross_as_one_pickle_large_ones_as_they_are() -> None:
    def batch(floats: int, n: int) -> list[tuple[int, Message]]:
        shared = RecordDict({"a": ArrayRecord({"w": Array(np.ones(floats, np.float32))})})
        return [(c, Message(shared, dst_node_id=NODE_BASE + c, message_type="train"))
                for c in range(n)]

    limit = SMALL_BATCH_BYTES // 4  # float32s of the threshold
    # a shared content counts once: 10 messages of a model just under the limit are small
    small = batch(limit - 100, 10)
    packed = pack(small)
    assert isinstance(packed, bytes) and len(packed) < SMALL_BATCH_BYTES + 10_000
    back = unpack(packed)
    assert [c for c, _ in back] == list(range(10))
    assert back[0][1].content is back[9][1].content  # still one content after the trip
    assert np.array_equal(back[3][1].content["a"]["w"].numpy(), np.ones(limit - 100))
    large = batch(limit, 2)
    assert pack(large) is large and unpack(large) is large
    errors = [Message(RecordDict(), dst_node_id=NODE_BASE, message_type="query.ping")]
    assert unpack(pack(errors))[0].metadata.message_type == "query.ping"


def test_inline_clients_use_engine_threads_and_the_server_keeps_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from fedkd.engine import inline

    scn = from_dict(ENGINE_SCENARIO)
    grid = inline.InlineGrid(build_world(scn), WorldSource(dump(scn), str(tmp_path), threads=1))
    seen: list[int] = []
    real = inline.run_batch

    def spy(*args: object) -> list[Message]:
        seen.append(torch.get_num_threads())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(inline, "run_batch", spy)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        replies = list(grid.send_and_receive([Message(
            RecordDict(), dst_node_id=NODE_BASE + c, message_type="query.ping") for c in (0, 1)]))
        assert len(replies) == 2 and seen == [1]
        assert torch.get_num_threads() == 2  # server work after the clients: its own count
    finally:
        torch.set_num_threads(saved)


def test_rounds_run_with_start_up_objects_frozen_and_the_freeze_ends_with_them(
        tmp_path: Path) -> None:
    import gc

    from fedkd.compose import build_strategy
    from fedkd.engine.inline import InlineGrid
    from fedkd.engine.runner import run_rounds

    scn = from_dict({**ENGINE_SCENARIO, "rounds": 2,
                     "clients": {"num": 6, "models": [{"arch": "mlp"}]}})
    world = build_world(scn)
    grid = InlineGrid(world, WorldSource(dump(scn), str(tmp_path)))
    frozen: list[int] = []
    run_rounds(world, build_strategy(scn, world), grid,
               lambda res: frozen.append(gc.get_freeze_count()))
    assert len(frozen) == 2 and min(frozen) > 10_000  # libraries, world, nodes: frozen
    assert gc.get_freeze_count() == 0  # given back to the collector when the run ends


def test_accounting_counts_exact_bytes_and_orders_replies() -> None:
    set_task_identity(SERVER_NODE_ID)
    down = np.zeros(10, dtype=np.float32)  # 40 bytes of data + the .npy header
    up = np.zeros(3, dtype=np.int64)  # 24 bytes of data + the .npy header
    header = len(Array(np.zeros(0, dtype=np.float32)).data)
    grid = AccountingGrid(EchoGrid(up))
    content = RecordDict({"arrays": ArrayRecord({"w": Array(down)}),
                          "config": ConfigRecord({"lr": 0.1})})
    msgs = [Message(content, dst_node_id=n, message_type="train") for n in (7, 5, 9)]
    replies = list(grid.send_and_receive(msgs))
    assert [r.metadata.src_node_id for r in replies] == [7, 5, 9]
    traffic = grid.reset()
    assert sorted(traffic) == [5, 7, 9]
    assert {t.down for t in traffic.values()} == {40 + header}
    assert {t.up for t in traffic.values()} == {24 + header}
    assert grid.reset() == {}


ENGINE_SCENARIO = {"name": "engine", "partition": {"name": "iid"},
                   "clients": {"num": 6, "models": [{"arch": "mlp"}]},
                   "data": {"name": "synthetic", "params": {"train_size": 200, "test_size": 50}}}


@pytest.fixture(scope="module")
def ray_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterable[RayGrid]:
    import ray

    scn = from_dict(ENGINE_SCENARIO)
    world = build_world(scn)
    run_dir: Path = tmp_path_factory.mktemp("engine")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    grid = RayGrid(world, WorldSource(dump(scn), str(run_dir)), actors=2)
    yield grid
    grid.shutdown()
    ray.shutdown()


def test_ray_grid_replies_in_order_and_errors_become_replies(ray_grid: RayGrid) -> None:
    ids = list(ray_grid.get_node_ids())
    assert ids == [NODE_BASE + c for c in range(6)]
    order = [ids[4], ids[0], ids[5], ids[2]]
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.ping") for n in order]
    msgs.append(Message(RecordDict(), dst_node_id=ids[1], message_type="query.nothing"))
    replies = list(ray_grid.send_and_receive(msgs))
    assert [r.metadata.src_node_id for r in replies] == [*order, ids[1]]
    assert [r.has_error() for r in replies] == [False] * 4 + [True]
    assert "nothing" in replies[-1].error.reason


def test_ray_grid_balances_by_training_flops(ray_grid: RayGrid) -> None:
    """Batches are balanced by each client's local-training FLOPs, not its data size alone
    (an architecture's cost per sample differs by orders of magnitude)."""
    from fedkd.clock import client_train_flops

    assert ray_grid.costs == client_train_flops(ray_grid.world)


def test_actors_that_cannot_be_placed_are_an_error(ray_grid: RayGrid, tmp_path: Path) -> None:
    """Ray would wait forever; fedkd stops after ``start_timeout`` naming the resources."""
    from fedkd.errors import ScenarioError

    scn = from_dict(ENGINE_SCENARIO)
    # the fixture's 2 actors hold both CPUs of this Ray instance: a third cannot be placed
    with pytest.raises(ScenarioError) as info:
        RayGrid(build_world(scn), WorldSource(dump(scn), str(tmp_path)), actors=1,
                start_timeout=2.0)
    assert info.value.path == "engine.client_resources"
    assert "within 2 s (1 actors; the cluster has {'CPU': 2.0})" in str(info.value)
    assert len(list(ray_grid.send_and_receive([Message(
        RecordDict(), dst_node_id=NODE_BASE, message_type="query.ping")]))) == 1


class CountingActor:
    """Wraps an actor handle and counts ``run.remote`` calls."""

    def __init__(self, actor: object) -> None:
        self.actor, self.calls, self.run = actor, 0, self

    def remote(self, batch: list) -> object:
        self.calls += 1
        return self.actor.run.remote(batch)  # type: ignore[attr-defined]


def test_ray_grid_sends_each_actor_one_batch_per_call(ray_grid: RayGrid) -> None:
    """README: each round's messages go to each actor as one batch (one Ray call)."""
    saved = ray_grid.actors
    counting = [CountingActor(a) for a in saved]
    ray_grid.actors = counting  # type: ignore[assignment]
    try:
        ids = list(ray_grid.get_node_ids())
        replies = list(ray_grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=n, message_type="query.ping") for n in ids]))
        assert len(replies) == 6 and [c.calls for c in counting] == [1, 1]
        ray_grid.send_and_receive([Message(RecordDict(), dst_node_id=ids[0],
                                           message_type="query.ping")])
        assert sum(c.calls for c in counting) == 3  # one message: one call
    finally:
        ray_grid.actors = saved


def test_ray_grid_handshake_reports_partition(ray_grid: RayGrid) -> None:
    ids = list(ray_grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({"seed": 0})}), dst_node_id=n,
                    message_type="query.hello") for n in ids]
    replies = list(ray_grid.send_and_receive(msgs))
    pids = [int(r.content.metric_records["metrics"]["partition-id"]) for r in replies]
    sizes = [int(r.content.metric_records["metrics"]["num-examples"]) for r in replies]
    assert pids == list(range(6))
    assert sum(sizes) == 200


def test_all_failed_round_raises_unless_dropout() -> None:
    from flwr.app import Error

    from fedkd.engine.runner import AllClientsFailed, check_replies

    set_task_identity(SERVER_NODE_ID)
    msgs = [Message(RecordDict(), dst_node_id=NODE_BASE + i, message_type="train")
            for i in range(3)]
    ok = Message(RecordDict(), reply_to=msgs[0])
    bug = [Message(Error(3, "ValueError: boom"), reply_to=m) for m in msgs]
    drop = [Message(Error(3, "ClientDropout: client 1 dropped out"), reply_to=m) for m in msgs]
    check_replies(1, [ok, *bug[1:]])  # some succeeded: the round goes on
    check_replies(1, drop)  # everyone dropped out by the scenario's failure model
    check_replies(1, [])
    with pytest.raises(AllClientsFailed, match="round 2: all 3 clients failed.*boom"):
        check_replies(2, bug)


def test_a_dead_actor_is_replaced_and_its_clients_fail(ray_grid: RayGrid) -> None:
    import ray

    ids = list(ray_grid.get_node_ids())
    ping = [Message(RecordDict(), dst_node_id=n, message_type="query.ping") for n in ids]
    dead = ray_grid.actors[0]
    ray.kill(dead, no_restart=True)
    for _ in range(600):  # the kill is asynchronous: wait until the actor is gone
        try:
            ray.get(dead.ready.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed actor kept answering")
    replies = list(ray_grid.send_and_receive(ping))
    failed = [r for r in replies if r.has_error()]
    assert 0 < len(failed) < len(ids)  # the dead actor's clients, and only those
    assert all(r.error.reason.startswith("WorkerDied: client ") for r in failed)
    assert ray_grid.replaced == 1 and ray_grid.actors[0] is not dead
    again = list(ray_grid.send_and_receive(
        [Message(RecordDict(), dst_node_id=n, message_type="query.ping") for n in ids]))
    assert len(again) == len(ids) and not any(r.has_error() for r in again)
