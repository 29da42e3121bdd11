"""The in-process engine, and the Grid interface fedkd's engines share.

:class:`BatchGrid` is the Flower ``Grid`` of every fedkd engine: node ids are
``NODE_BASE + partition id``, messages get ids, ``push_messages``/``pull_messages`` and
``send_and_receive`` run through one ``_execute(messages, timeout)`` that an engine supplies.
:class:`InlineGrid` executes each message with the fedkd ClientApp in this process, one after
another (or, with ``engine.batched``, a round's plain train messages of one architecture in
one vectorised step, :mod:`fedkd.engine.batching`): no Ray, no worker processes
(``engine.name: inline``). It is the engine to debug a
strategy with (breakpoints work in client code), and the reference the other engines must
match: the same scenario and seed give the same metrics on every engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedkd.client import WorldSource
from fedkd.compose import client_app
from fedkd.engine.batching import BatchedTrain
from fedkd.faults import ERROR_CODE_CLIENT
from fedkd.train import warm_up
from fedkd.world import World, install_world

#: Node ids are ``NODE_BASE + partition id`` (kept clear of Flower's reserved ids).
NODE_BASE = 1 << 20
RUN_ID = 1
SERVER_NODE_ID = 1


def set_task_identity(node_id: int) -> None:
    """Give this process the Flower task identity that ``Message(...)`` requires."""
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = 1


def run_batch(app: object, batch: Sequence[tuple[int, Message]],
              num_clients: int) -> list[Message]:
    """Run the ClientApp on each ``(partition id, message)``; exceptions become error replies."""
    replies = []
    for cid, msg in batch:
        ctx = Context(run_id=RUN_ID, node_id=NODE_BASE + cid,
                      node_config={"partition-id": cid, "num-partitions": num_clients},
                      state=RecordDict(), run_config={})
        try:
            replies.append(app(msg, ctx))  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - a failing client must not stop the run
            replies.append(Message(Error(ERROR_CODE_CLIENT, f"{type(exc).__name__}: {exc}"),
                                   reply_to=msg))
    return replies


class BatchGrid(Grid):
    """A Flower Grid whose nodes are the scenario's clients; subclasses execute messages.

    Parameters
    ----------
    num_clients : int
        Number of client nodes.
    """

    def __init__(self, num_clients: int, world: World | None = None) -> None:
        set_task_identity(SERVER_NODE_ID)
        self.num_clients = num_clients
        self.world = world
        self._run = Run.create_empty(run_id=RUN_ID)
        self._ids = itertools.count(1)
        self._inbox: dict[str, Message] = {}

    def roster(self) -> list[dict[str, Any]] | None:
        """What every node's ``query.hello`` handshake would answer (node and partition id,
        architecture, data size, label counts), read from the world this grid simulates
        instead of messaging every node, so that no round touches the whole population;
        None when the grid holds no world."""
        w = self.world
        if w is None:
            return None
        counts = w.counts
        return [{"node_id": NODE_BASE + c, "cid": c, "arch": w.archs[c],
                 "num_examples": len(w.parts[c]),
                 "label_counts": tuple(int(x) for x in counts[c])}
                for c in range(self.num_clients)]

    def set_run(self, run: Run) -> None:
        """Set the run (kept for the Grid interface)."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Create an instruction message from the server."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        """All client node ids."""
        return [NODE_BASE + cid for cid in range(self.num_clients)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the messages now; their replies wait to be pulled by message id."""
        msgs = list(messages)
        ids = [self._assign_id(m) for m in msgs]
        for mid, reply in zip(ids, self._execute(msgs, None), strict=True):
            if reply is not None:
                self._inbox[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies of earlier pushed messages that have arrived."""
        return [self._inbox.pop(m) for m in message_ids if m in self._inbox]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send messages, wait for the replies (at most ``timeout`` s), in sending order."""
        msgs = list(messages)
        for m in msgs:
            self._assign_id(m)
        return [r for r in self._execute(msgs, timeout) if r is not None]

    def _assign_id(self, msg: Message) -> str:
        mid = f"m{next(self._ids)}"
        msg.metadata.__dict__["_message_id"] = mid
        return mid

    def _execute(self, msgs: list[Message], timeout: float | None) -> list[Message | None]:
        """Replies to ``msgs`` in order (None where none came within ``timeout``)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release the engine's workers (none by default)."""


class InlineGrid(BatchGrid):
    """Every client runs the fedkd ClientApp in this process, one message after another.

    Clients train with ``engine.threads`` torch threads, as in a client actor, and the
    process goes back to the server's thread count (``server.threads``) when they are done.
    """

    def __init__(self, world: World, source: WorldSource) -> None:
        super().__init__(world.num_clients, world)
        install_world(world)
        warm_up()  # clients train in this process: their first optimizer's imports, now
        self.app = client_app(source)
        self.threads = source.threads
        self.batched = BatchedTrain(self.app, source) if world.scenario.engine.batched else None

    def _execute(self, msgs: list[Message], timeout: float | None) -> list[Message | None]:
        batch = [(m.metadata.dst_node_id - NODE_BASE, m) for m in msgs]
        server_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            app = self.app if self.batched is None else self.batched.prepare(batch)
            return list(run_batch(app, batch, self.num_clients))
        finally:
            torch.set_num_threads(server_threads)
