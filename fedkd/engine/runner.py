"""The round loop, owned once: sample -> train -> aggregate -> evaluate -> record.

It drives any Flower message-API strategy over any Flower ``Grid`` (fedkd's RayGrid or
Flower's own simulation grid) the way ``Strategy.start`` does, and adds what a simulator
needs: exact byte accounting of every message, deterministic reply order, centralized test
evaluation every ``eval_every`` rounds and a per-round callback for the run records.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedkd.budget import Budgeted, BudgetExhausted
from fedkd.checkpoint import from_safe, rng_state, set_rng_state, to_safe
from fedkd.client import train_config_record
from fedkd.clock import Clock, ClockGrid, make_clock
from fedkd.comm import GridWrapper, arrayrecord_to_state_dict, message_bytes, split_groups
from fedkd.faults import ERROR_CODE_CLIENT, SIMULATED
from fedkd.train import evaluate, predict
from fedkd.wire import Refs, Wire, decode_replies, encode_cached, make_wire
from fedkd.world import World, local_summary


@dataclass
class Traffic:
    """What crossed the network for one node in one round."""

    down: int = 0
    up: int = 0
    failed: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)


class AccountingGrid(GridWrapper):
    """Wraps a Grid: encodes messages for the wire, counts their bytes per node, orders replies.

    With a :class:`~fedkd.wire.Wire`, outgoing messages are encoded with ``comm.down`` before
    they are counted and sent, and replies are counted, then decoded with ``comm.up``: the
    counts are the encoded payloads. Replies are returned in the order the messages were
    sent, whatever order the inner grid delivered them in, so aggregation is deterministic
    on every engine.
    """

    def __init__(self, inner: Grid, wire: Wire | None = None) -> None:
        super().__init__(inner)
        self.wire = wire if wire is not None and wire.active else None
        self.traffic: dict[int, Traffic] = {}
        self.spent = 0  # bytes down and up since the start of the run
        self.reply_sizes: dict[tuple[str, int], int] = {}  # largest reply per (type, node)
        self._refs: dict[int, Refs] = {}
        self._encoded: dict[int, RecordDict] = {}  # contents already encoded this round
        self._estimates: dict[int, int] = {}  # reply estimates of those contents
        self._sent: dict[int, Message] = {}  # the last message sent to each node
        #: bytes the run may have sent at most (a budget sets it); a reply past it is dropped
        #: as if its client had been told not to upload (``BudgetExceeded``), uncounted
        self.limit: float | None = None

    def reset(self) -> dict[int, Traffic]:
        """Return this round's traffic and start a new round."""
        out, self.traffic = self.traffic, {}
        self._encoded, self._estimates = {}, {}
        return out

    def _node(self, node_id: int) -> Traffic:
        return self.traffic.setdefault(node_id, Traffic())

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Encode, count and push."""
        msgs = self.encode(list(messages))
        self._count_down(msgs)
        return self.inner.push_messages(msgs)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull, count and decode."""
        replies = self._count_up(list(self.inner.pull_messages(message_ids)))
        return self._decode(replies)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Count, send, count, and order the replies as the messages were sent."""
        msgs = list(messages)
        if not msgs:
            return []
        msgs = self.encode(msgs)
        self._count_down(msgs)
        replies = list(self.inner.send_and_receive(msgs, timeout=timeout))
        order = {m.metadata.dst_node_id: i for i, m in enumerate(msgs)}
        replies.sort(key=lambda r: order.get(r.metadata.src_node_id, len(order)))
        return self._decode(self._count_up(replies))

    def set_limit(self, limit: float | None) -> None:
        """Bytes the run may have sent at most from now on (None: no limit)."""
        self.limit = limit

    def encode(self, msgs: list[Message]) -> list[Message]:
        """Encode messages for the wire now (a budget prices them before they are sent)."""
        if self.wire is None:
            return msgs
        todo = [m for m in msgs if id(m.content) not in self._encoded]
        todo, refs = encode_cached(self.wire, todo)
        self._refs.update(refs)
        self._encoded.update({id(m.content): m.content for m in todo})
        return msgs

    def reply_estimate(self, msg: Message) -> int:
        """Bytes of a reply that mirrors ``msg``'s arrays, encoded with ``comm.up`` (once per
        content: the nodes of a group share one)."""
        if self.wire is None:
            return message_bytes(msg.content)
        key = id(msg.content)
        if key not in self._estimates:
            decoded = self.wire.decode(msg.content, self.wire.down)
            node = msg.metadata.dst_node_id
            self._estimates[key] = message_bytes(self.wire.encode(
                decoded, self.wire.up, 0, 0, node, refs=self._refs.get(node)))
        return self._estimates[key]

    def _decode(self, replies: list[Message]) -> list[Message]:
        if self.wire is None:
            return replies
        return decode_replies(self.wire, replies, self._refs)

    def _count_down(self, msgs: list[Message]) -> None:
        for m in msgs:
            self._sent[m.metadata.dst_node_id] = m
            nbytes = message_bytes(m.content)
            self._node(m.metadata.dst_node_id).down += nbytes
            self.spent += nbytes

    def _count_up(self, replies: list[Message]) -> list[Message]:
        out = []
        for r in replies:
            t = self._node(r.metadata.src_node_id)
            if r.has_error():
                t.failed = True
                out.append(r)
                continue
            nbytes = message_bytes(r.content)
            key = (r.metadata.message_type, r.metadata.src_node_id)
            self.reply_sizes[key] = max(self.reply_sizes.get(key, 0), nbytes)
            if self.limit is not None and self.spent + nbytes > self.limit:
                t.failed = True
                out.append(Message(Error(ERROR_CODE_CLIENT, f"BudgetExceeded: a {nbytes} B "
                                         f"reply would pass the budget; not sent"),
                                   reply_to=self._sent[r.metadata.src_node_id]))
                continue
            out.append(r)
            t.up += nbytes
            self.spent += nbytes
            kind = r.metadata.message_type.split(".")[0]
            target = {"train": t.metrics, "evaluate": t.eval}.get(kind)
            if target is not None:
                for rec in r.content.metric_records.values():
                    target.update({k: v for k, v in rec.items() if isinstance(v, int | float)})
        return out


LOG = logging.getLogger("fedkd")


class AllClientsFailed(RuntimeError):
    """Every client of a round failed for a reason other than the scenario's failure model."""


def check_replies(server_round: int, replies: list[Message]) -> None:
    """Log every failed reply; raise when all of a round's replies failed with a real error."""
    errors = [r.error.reason for r in replies if r.has_error()]
    for reason in errors:
        LOG.warning("round %d: client error: %s", server_round, reason)
    real = [e for e in errors if not e.startswith(SIMULATED)]
    if replies and len(errors) == len(replies) and real:
        raise AllClientsFailed(f"round {server_round}: all {len(replies)} clients failed; "
                               f"first error: {real[0]}")


def central_evaluate(world: World, arrays: ArrayRecord, batch_size: int) -> dict[str, float]:
    """Test accuracy and loss of every architecture group's global model.

    ``acc``/``loss`` are the means over groups weighted by how many clients run each group;
    ``acc/<arch>`` and ``loss/<arch>`` are added when there is more than one group. With
    local test splits (``data.local_test_fraction > 0``) the personalised metrics of the
    global model are added too (:func:`local_evaluate`).
    """
    groups = split_groups(arrays)
    if not groups:
        return {}
    share = Counter(world.archs)
    test = world.data.test
    out: dict[str, float] = {}
    acc = loss = 0.0
    total = sum(share[a] for a in groups) or 1
    models: dict[str, nn.Module] = {}
    for arch, rec in groups.items():
        model = models[arch] = world.new_model(arch, seed=0)
        model.load_state_dict(arrayrecord_to_state_dict(rec))
        g_loss, g_acc = evaluate(model, test.x, test.y, batch_size)
        if len(groups) > 1:
            out[f"acc/{arch}"], out[f"loss/{arch}"] = g_acc, g_loss
        acc += g_acc * share[arch] / total
        loss += g_loss * share[arch] / total
    out["acc"], out["loss"] = acc, loss
    out.update(local_evaluate(world, models, batch_size))
    return out


def local_evaluate(world: World, models: dict[str, nn.Module],
                   batch_size: int) -> dict[str, float]:
    """Personalised metrics of the global model: each client's group model on its own local
    test split (the world holds every client's split, so nothing is sent).

    A client is scored with its architecture's model, or with the only model when there is
    one group (e.g. FML's shared model); one forward pass per group over the concatenated
    splits of its clients.

    Returns
    -------
    dict[str, float]
        :func:`fedkd.world.local_summary` of the per-client accuracies and losses
        (``local-acc``, ``local-acc-worst10``, ``local-acc-std``, ``local-loss``); empty
        without local test splits.
    """
    if not world.has_local_tests or not models:
        return {}
    only = next(iter(models.values())) if len(models) == 1 else None
    by_model: dict[int, list[int]] = {}
    for cid, arch in enumerate(world.archs):
        model = models.get(arch, only)
        if model is not None and len(world.local_tests[cid]):
            by_model.setdefault(id(model), []).append(cid)
    owners = {id(m): m for m in models.values()}
    accs, losses = [], []
    pool = world.data.pool
    for key, cids in by_model.items():
        idx = torch.from_numpy(np.concatenate([world.local_tests[c] for c in cids]))
        logits = predict(owners[key], pool.x[idx], batch_size)
        y = pool.y[idx]
        sizes = [len(world.local_tests[c]) for c in cids]
        hits = torch.split((logits.argmax(1) == y).double(), sizes)
        nll = torch.split(F.cross_entropy(logits, y, reduction="none").double(), sizes)
        accs += [float(h.mean()) for h in hits]
        losses += [float(n.mean()) for n in nll]
    return local_summary(accs, losses)


@dataclass(frozen=True)
class RunEnd:
    """How a run of rounds ended: its final global arrays and its status."""

    arrays: ArrayRecord
    status: str


@dataclass(frozen=True)
class RoundResult:
    """Everything the records need about one finished round."""

    round: int
    arrays: ArrayRecord
    train_metrics: dict[str, Any]
    eval_metrics: dict[str, float]
    traffic: dict[int, Traffic]
    seconds: float


def freeze_startup_objects() -> None:
    """Collect what is already garbage, then have the garbage collector leave alone every
    object that exists now (``gc.freeze``).

    What start-up made (the libraries' modules and functions, the world, a population's node
    records) lives for the whole run; a full collection walked its 240,000 objects and more
    in 0.13 to 0.19 s, several times a run, inside rounds (the first round at 100,000 clients
    took 0.45 to 0.6 s against 0.2 s at 1,000). Client actors call it once started.
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_startup_objects() -> Iterator[None]:
    """:func:`freeze_startup_objects` for the block; the objects are the collector's again
    after it (a process that runs several simulations leaks none)."""
    freeze_startup_objects()
    try:
        yield
    finally:
        gc.unfreeze()


def run_rounds(world: World, strategy: Any, grid: Grid,
               on_round: Callable[[RoundResult], None],
               arrays: ArrayRecord | None = None, first_round: int = 1,
               resume: dict[str, Any] | None = None,
               on_checkpoint: Callable[[dict[str, Any]], None] | None = None) -> RunEnd:
    """Run the scenario's rounds of ``strategy`` over ``grid``.

    Parameters
    ----------
    world : World
        The simulated world (scenario, data).
    strategy : flwr.serverapp.strategy.Strategy
        Any message-API strategy.
    grid : Grid
        Where messages go.
    on_round : Callable
        Called with each finished round's :class:`RoundResult`.
    arrays : ArrayRecord, optional
        Starting global arrays (default: ``strategy.initial_arrays(world)``; none for
        strategies without a global model, which report accuracy from client evaluation).
    first_round : int
        Round to start from (for resumed runs).
    resume : dict, optional
        A checkpoint's ``grid``, ``clock`` and ``rng`` state (see :func:`run_state`), put
        back before the first round.
    on_checkpoint : Callable, optional
        Called with :func:`run_state` every ``checkpoint_every`` rounds.

    Returns
    -------
    RunEnd
        The final global arrays and how the run ended (``completed``, or
        ``budget_exhausted`` when a budget-wrapped strategy cannot fit the next round).
    """
    scn = world.scenario
    acct = AccountingGrid(grid, make_wire(scn.comm, scn.seed))
    clock = make_clock(world)
    net: Grid = acct if clock is None else ClockGrid(acct, clock,
                                                     lambda nid: strategy.node(nid).cid)
    if arrays is None:
        arrays = (strategy.initial_arrays(world) if hasattr(strategy, "initial_arrays")
                  else ArrayRecord())
    if resume is not None:
        restore_run_state(resume, acct, clock)
    train_cfg = train_config_record(scn.clients.train, scn.seed, scn.clients.dropout,
                                    scn.clients.crash)
    budgeted = isinstance(strategy, Budgeted)
    if getattr(net, "roster", None) is not None and hasattr(strategy, "discover"):
        # fedkd's grids know every node without messaging it: meet them during start-up,
        # so that the first round costs what the others do at any population size
        strategy.discover(net)
    with frozen_startup_objects():
        for rnd in range(first_round, scn.rounds + 1):
            start = time.perf_counter()
            try:
                msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_cfg)),
                                                     net))
            except BudgetExhausted as exc:
                LOG.warning("budget exhausted; stopping before round %d: %s", rnd, exc)
                acct.reset()
                return RunEnd(arrays, "budget_exhausted")
            replies = list(net.send_and_receive(msgs))
            check_replies(rnd, replies)
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = new_arrays
            metrics: dict[str, float] = {}
            eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), net))
            if eval_msgs:
                fed = strategy.aggregate_evaluate(rnd, net.send_and_receive(eval_msgs))
                metrics.update({k: float(v) for k, v in (fed or {}).items()
                                if isinstance(v, int | float) and k != "num-examples"})
            # a budgeted run may end after any round: every round is evaluated
            if len(arrays) and (budgeted or rnd % scn.eval_every == 0 or rnd == scn.rounds):
                metrics.update(central_evaluate(world, arrays, scn.server.eval_batch_size))
            if budgeted:
                metrics.update(strategy.round_metrics(rnd, acct))
            if clock is not None:
                metrics.update(clock.metrics(rnd))
            on_round(RoundResult(round=rnd, arrays=arrays, train_metrics=dict(train_metrics or {}),
                                 eval_metrics=metrics, traffic=acct.reset(),
                                 seconds=time.perf_counter() - start))
            every = scn.checkpoint_every
            if on_checkpoint is not None and every and rnd % every == 0:
                on_checkpoint(run_state(rnd, arrays, acct, clock))
        return RunEnd(arrays, "completed")


def run_state(rnd: int, arrays: ArrayRecord, acct: AccountingGrid,
              clock: Clock | None) -> dict[str, Any]:
    """What the runner itself must carry over a resume: the round, the global arrays, the
    bytes spent (budgets), the virtual clock and the global RNG states."""
    return {"round": rnd, "arrays": to_safe(arrays),
            "grid": {"spent": acct.spent, "reply_sizes": to_safe(acct.reply_sizes)},
            "clock": None if clock is None else to_safe(
                {"elapsed": clock.elapsed, "round_s": clock.round_s,
                 "stragglers": clock.stragglers, "offline": clock.offline}),
            "rng": rng_state()}


def restore_run_state(state: dict[str, Any], acct: AccountingGrid, clock: Clock | None) -> None:
    """Put back what :func:`run_state` saved (the RNG states last)."""
    acct.spent = int(state["grid"]["spent"])
    acct.reply_sizes = from_safe(state["grid"]["reply_sizes"], None)
    if clock is not None and state["clock"] is not None:
        for key, value in from_safe(state["clock"], None).items():
            setattr(clock, key, value)
    set_rng_state(state["rng"])
