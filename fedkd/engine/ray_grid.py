"""RayGrid: a Flower ``Grid`` over a pool of Ray actors running the fedkd ClientApp.

Each round's messages are grouped into ONE batch per actor (balanced by each client's
local-training FLOPs: its architecture's cost per sample times the samples it trains on)
and sent as one Ray call, instead of one call per message: at 100 trivial clients that is a
few milliseconds per round, against ~0.3 s for Flower's own polling simulation engine. A batch
whose arrays are small crosses as one pickle made by the sender (:func:`pack`: the C pickler,
highest protocol): Ray's own serializer goes through cloudpickle object by object, which took
about as long as the round's Ray calls themselves when nothing else crossed. A batch that
carries models goes through Ray's serializer, which copies their bytes once fewer (35 ms
less a round for 20 replies of 1.7 MB). Messages that share one content (a round's broadcast
model) share it either way, so it crosses once per actor.
The world (dataset tensors, partitions) goes into Ray's object store once and every actor
receives it at start-up. Replies come back in the order the messages were sent. An actor
that dies (killed, out of memory) is replaced at once; the clients it held that round come
back as error replies (``WorkerDied``), counted as failures, and later rounds run normally.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from flwr.app import Error, Message

from fedkd.client import WorldSource
from fedkd.clock import client_train_flops
from fedkd.comm import message_bytes
from fedkd.compose import client_app
from fedkd.engine.batching import BatchedTrain
from fedkd.engine.inline import (
    NODE_BASE,
    SERVER_NODE_ID,
    BatchGrid,
    run_batch,
    set_task_identity,
)
from fedkd.engine.runner import freeze_startup_objects
from fedkd.errors import ScenarioError
from fedkd.faults import ERROR_CODE_CLIENT
from fedkd.train import warm_up
from fedkd.world import World, install_world

LOG = logging.getLogger("fedkd")


class WorkerDied(RuntimeError):
    """A client's worker process died while it held the client's message."""


@ray.remote
class ClientActor:
    """A worker process that runs batches of client messages through the ClientApp."""

    def __init__(self, world: World, source: WorldSource) -> None:
        install_world(world)
        warm_up()
        set_task_identity(SERVER_NODE_ID)
        self.app = client_app(source)
        self.num_clients = world.num_clients
        self.batched = BatchedTrain(self.app, source) if world.scenario.engine.batched else None
        freeze_startup_objects()  # what start-up made lives as long as the actor

    def run(self, payload: list[tuple[int, Message]] | bytes) -> list[Message] | bytes:
        """Process one batch of ``(partition id, message)`` pairs in order (:func:`pack`ed);
        the replies, packed (``engine.batched``: plain train messages of one architecture
        trained together, :mod:`fedkd.engine.batching`)."""
        batch = unpack(payload)
        app = self.app if self.batched is None else self.batched.prepare(batch)
        return pack(run_batch(app, batch, self.num_clients))

    def ready(self) -> str:
        """Return, once the actor is constructed, the id of the Ray node it runs on."""
        return ray.get_runtime_context().get_node_id()


#: A batch whose distinct contents hold fewer array bytes than this crosses as one pickle.
SMALL_BATCH_BYTES = 1 << 20


def pack(items: list[Any]) -> list[Any] | bytes:
    """``items`` (messages, or ``(partition id, message)`` pairs) as one pickle when their
    distinct contents hold fewer than :data:`SMALL_BATCH_BYTES` array bytes, else as is (for
    Ray's serializer)."""
    seen: set[int] = set()
    size = 0
    for item in items:
        msg = item[1] if isinstance(item, tuple) else item
        content = msg.content if msg.has_content() else None
        if content is None or id(content) in seen:
            continue
        seen.add(id(content))
        size += message_bytes(content)
        if size >= SMALL_BATCH_BYTES:
            return items
    return pickle.dumps(items, pickle.HIGHEST_PROTOCOL)


def unpack(payload: list[Any] | bytes) -> list[Any]:
    """The inverse of :func:`pack`."""
    return pickle.loads(payload) if isinstance(payload, bytes) else payload


def balance(costs: Sequence[float], bins: int) -> list[list[int]]:
    """Greedy longest-processing-time assignment of item indices to ``bins`` workers."""
    loads = [0.0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(bins), key=lambda j: (loads[j], j))
        out[b].append(i)
        loads[b] += costs[i]
    return [sorted(o) for o in out]


class RayGrid(BatchGrid):
    """A Flower Grid whose nodes are the scenario's clients, executed by Ray actors.

    Parameters
    ----------
    world : World
        The simulated world (put into Ray's object store once).
    source : WorldSource
        Scenario and run folder, for the actors' ClientApp.
    actors : int
        Number of actor processes.
    num_cpus, num_gpus : float
        Ray resources per actor (fractional GPUs allowed).
    start_timeout : float
        Seconds the actors may take to be placed and started; past it the run stops with an
        error naming ``engine.client_resources`` and what the cluster has (Ray itself would
        wait forever for resources it cannot place).
    """

    def __init__(self, world: World, source: WorldSource, actors: int, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, start_timeout: float = 300.0) -> None:
        super().__init__(world.num_clients, world)
        self.costs = [max(f, 1.0) for f in client_train_flops(world)]
        ref = ray.put(world)
        opts = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        self._spawn = lambda: ClientActor.options(**opts).remote(ref, source)
        self.actors = [self._spawn() for _ in range(actors)]
        self.replaced = 0
        self.run_dir = source.run_dir
        #: The Ray node of each actor, and of the actor that last ran each client.
        self.actor_nodes: list[str] = []
        self.client_nodes: dict[int, str] = {}
        try:
            self.actor_nodes = ray.get([a.ready.remote() for a in self.actors],
                                       timeout=start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
            raise ScenarioError("engine.client_resources", opts,
                                f"what the cluster can place within {start_timeout:g} s "
                                f"({actors} actors; the cluster has {have})") from None

    # ---------------------------------------------------------------- execution
    def _execute(self, msgs: list[Message], timeout: float | None) -> list[Message | None]:
        if not msgs:
            return []
        cids = [m.metadata.dst_node_id - NODE_BASE for m in msgs]
        plan = balance([self.costs[c] for c in cids], min(len(self.actors), len(msgs)))
        # every batch packed before the first is sent: the actors start close together
        payloads = [(b, idx, pack([(cids[i], msgs[i]) for i in idx]))
                    for b, idx in enumerate(plan) if idx]
        futures = {self.actors[b].run.remote(payload): (b, idx) for b, idx, payload in payloads}
        for b, idx in enumerate(plan):
            self.client_nodes.update((cids[i], self.actor_nodes[b]) for i in idx)
        replies: list[Message | None] = [None] * len(msgs)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(futures)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=left)
            for fut in done:
                b, idx = futures[fut]
                try:
                    out = unpack(ray.get(fut))
                except ray.exceptions.RayActorError as exc:
                    self._replace(b)
                    reason = " ".join(str(exc).split())[:300]
                    out = [Message(Error(ERROR_CODE_CLIENT, f"{WorkerDied.__name__}: client "
                                         f"{cids[i]} lost with its worker: {reason}"),
                                   reply_to=msgs[i]) for i in idx]
                except ray.exceptions.RayError as exc:
                    out = [Message(Error(ERROR_CODE_CLIENT, f"worker failed: {exc}"),
                                   reply_to=msgs[i]) for i in idx]
                for i, reply in zip(idx, out, strict=True):
                    replies[i] = reply
            if deadline is not None and time.monotonic() >= deadline:
                break
        return replies

    def _replace(self, b: int) -> None:
        """Start a new actor in place of actor ``b``, which died (killed, out of memory)."""
        LOG.warning("client actor %d died; replacing it", b)
        with contextlib.suppress(Exception):
            ray.kill(self.actors[b])
        self.actors[b] = self._spawn()
        self.actor_nodes[b] = ray.get(self.actors[b].ready.remote())
        self.replaced += 1

    def shutdown(self) -> None:
        """Stop the actors and write ``placement.json`` in the run folder: the Ray node of
        every actor and of the actor that last ran each client."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self.client_nodes and Path(self.run_dir).is_dir():
            (Path(self.run_dir) / "placement.json").write_text(json.dumps({
                "nodes": sorted(set(self.actor_nodes)),
                "clients": {str(c): n for c, n in sorted(self.client_nodes.items())}}))
