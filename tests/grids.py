"""Toy Flower grids for tests that need nodes without an engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid


class ToyGrid(Grid):
    """The parts of a Flower Grid a toy grid does not use; subclasses answer messages."""

    node_ids: list[int]

    def set_run(self, run: object) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self) -> object:  # pragma: no cover - unused
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError


class PlainGrid(ToyGrid):
    """Nodes running a plain Flower ClientApp: ``train`` adds the node's number to every array
    and reports ``num-examples``; any other message type is an error, as in Flower.

    ``mods`` are Flower ClientApp mods wrapped around that handler (e.g. the wire's codecs).
    """

    def __init__(self, node_ids: list[int], mods: Sequence[Any] = ()) -> None:
        self.node_ids = node_ids
        self.mods = list(mods)
        self.sent: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for m in messages:
            self.sent.append(m)
            if m.metadata.message_type != "train":
                replies.append(Message(Error(0, "No query function registered with name "
                                                "'hello'"), reply_to=m))
                continue
            k = self.node_ids.index(m.metadata.dst_node_id) + 1
            ctx = Context(run_id=1, node_id=m.metadata.dst_node_id,
                          node_config={"partition-id": k - 1}, state=RecordDict(),
                          run_config={})
            call = train
            for mod in reversed(self.mods):
                call = partial(mod, call_next=call)
            replies.append(call(m, ctx))
        return replies


def train(msg: Message, context: Context) -> Message:
    """Add ``k`` (partition id + 1) to every array; report ``10 k`` examples."""
    k = int(context.node_config["partition-id"]) + 1
    arrays = ArrayRecord({key: Array(a.numpy() + np.asarray(k, a.numpy().dtype))
                          for key, a in msg.content["arrays"].items()})
    return Message(RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": 10 * k, "train_loss": float(k)})}),
        reply_to=msg)


def run_in_process(world: Any, run_dir: Any, strategy: Any = None) -> list[Any]:
    """Every round of the world's scenario on the inline engine; the per-round results."""
    from fedkd.client import WorldSource
    from fedkd.compose import build_strategy
    from fedkd.engine.inline import InlineGrid
    from fedkd.engine.runner import run_rounds
    from fedkd.scenario import dump

    strategy = strategy if strategy is not None else build_strategy(world.scenario, world)
    grid = InlineGrid(world, WorldSource(dump(world.scenario), str(run_dir)))
    results: list[Any] = []
    run_rounds(world, strategy, grid, results.append)
    return results


class CidGrid:
    """Answers every message with ``reply(cid)``, ``cid`` the destination's partition id
    (from the strategy's handshake), and keeps what was sent."""

    def __init__(self, strategy: Any, reply: Callable[[int], RecordDict]) -> None:
        self.strategy, self.reply = strategy, reply
        self.sent: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.sent.extend(messages)
        return [Message(self.reply(self.strategy.node(m.metadata.dst_node_id).cid), reply_to=m)
                for m in messages]
