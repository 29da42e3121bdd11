"""Devices and a virtual clock: how long each round would take on the scenario's devices.

Each client gets a device profile (``clients.devices.profiles``, assigned by fraction with the
scenario seed). A participant's virtual time in an exchange is

    training FLOPs / (gflops · 10⁹) + 8 · bytes down / (down_mbps · 10⁶)
                                    + 8 · bytes up / (up_mbps · 10⁶)

where the training FLOPs are counted once per architecture with torch's flop counter (one
forward and backward pass of one sample, times the samples local training processes:
``steps · batch_size``, or ``epochs · `` the client's data size), and the bytes are the
encoded payloads the message layer counted. A train exchange ends at ``clients.deadline_s``
or when its last kept participant finishes; participants past the deadline are stragglers:
their reply is discarded (an error reply ``Straggler``; their download counts, their upload
does not). A client is online in a round with its profile's ``availability`` (seeded), or as
a trace file says (``client, round, online``); messages to offline clients are not sent.

The clock is a grid wrapper the runner puts between the strategy and the accounting grid: no
strategy changes, nothing sleeps, wall time never depends on simulated slowness. Work other
than local training (distillation on public data, generators) is not timed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from flwr.app import Error, Message
from torch.utils.flop_counter import FlopCounterMode

from fedkd.comm import GridWrapper
from fedkd.errors import ScenarioError
from fedkd.faults import ERROR_CODE_CLIENT
from fedkd.models import assign_archs
from fedkd.wire import server_round_of

STRAGGLER = "Straggler"


@dataclass(frozen=True)
class Device:
    """One device profile: compute speed, bandwidths and availability."""

    name: str
    gflops: float
    up_mbps: float
    down_mbps: float
    availability: float = 1.0

    def seconds(self, flops: float, down: int, up: int) -> float:
        """Virtual seconds to train ``flops`` and move ``down``/``up`` bytes."""
        return (flops / (self.gflops * 1e9) + 8 * down / (self.down_mbps * 1e6)
                + 8 * up / (self.up_mbps * 1e6))


def train_flops_per_sample(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward and backward pass of one sample (torch's flop counter)."""
    model = model.train()
    x = torch.zeros(2, *input_shape)  # two samples: BatchNorm needs more than one
    with FlopCounterMode(display=False) as counter:
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops() // 2)


def read_trace(path: str) -> dict[tuple[int, int], bool]:
    """``(client, round) -> online`` from a Parquet or CSV file with those three columns."""
    p = Path(path)
    if not p.is_file():
        raise ScenarioError("clients.devices.trace", path, "an existing Parquet or CSV file")
    table = pq.read_table(p) if p.suffix == ".parquet" else pacsv.read_csv(p)
    missing = {"client", "round", "online"} - set(table.column_names)
    if missing:
        raise ScenarioError("clients.devices.trace", path,
                            f"a table with columns client, round, online (missing "
                            f"{sorted(missing)})")
    rows = table.select(["client", "round", "online"]).to_pylist()
    return {(int(r["client"]), int(r["round"])): bool(r["online"]) for r in rows}


@dataclass
class Clock:
    """Per-client devices and the run's virtual time.

    Parameters
    ----------
    devices : Sequence[Device]
        Device of each client id.
    flops : Sequence[float]
        Training FLOPs of each client's local training.
    deadline : float, optional
        Seconds after which a train exchange's participants are stragglers.
    seed : int
        Seeds availability draws.
    trace : dict, optional
        ``(client, round) -> online``; rounds or clients it lacks use the profile.
    """

    devices: Sequence[Device]
    flops: Sequence[float]
    deadline: float | None = None
    seed: int = 0
    trace: dict[tuple[int, int], bool] | None = None
    elapsed: float = 0.0
    round_s: dict[int, float] = field(default_factory=dict)
    stragglers: dict[int, int] = field(default_factory=dict)
    offline: dict[int, int] = field(default_factory=dict)

    def online(self, cid: int, server_round: int) -> bool:
        """Whether client ``cid`` is reachable in ``server_round``."""
        if self.trace is not None and (cid, server_round) in self.trace:
            return self.trace[(cid, server_round)]
        p = self.devices[cid].availability
        return p >= 1.0 or bool(np.random.default_rng([self.seed, server_round, cid, 11])
                                .random() < p)

    def exchange(self, server_round: int, times: dict[int, float], train: bool) -> list[int]:
        """Advance the clock by one exchange; returns the clients past the deadline."""
        late = ([c for c, t in times.items() if t > self.deadline]
                if train and self.deadline is not None else [])
        kept = [t for c, t in times.items() if c not in late]
        seconds = self.deadline if late else max(kept, default=0.0)
        self.round_s[server_round] = self.round_s.get(server_round, 0.0) + float(seconds or 0.0)
        self.elapsed += float(seconds or 0.0)
        if train:
            self.stragglers[server_round] = self.stragglers.get(server_round, 0) + len(late)
        return late

    def metrics(self, server_round: int) -> dict[str, float]:
        """``virtual_s``, ``virtual_time``, ``stragglers`` and ``offline`` of a round."""
        return {"virtual_s": self.round_s.get(server_round, 0.0), "virtual_time": self.elapsed,
                "stragglers": float(self.stragglers.get(server_round, 0)),
                "offline": float(self.offline.get(server_round, 0))}


def make_clock(world: Any) -> Clock | None:
    """The clock of a world whose scenario gives ``clients.devices`` (None otherwise)."""
    scn = world.scenario
    spec = scn.clients.devices
    if spec is None:
        return None
    names = assign_archs([(p.name, p.fraction) for p in spec.profiles], world.num_clients,
                         scn.seed + 104729)
    by_name = {p.name: Device(p.name, p.gflops, p.up_mbps, p.down_mbps, p.availability)
               for p in spec.profiles}
    trace = read_trace(spec.trace) if spec.trace else None
    return Clock([by_name[n] for n in names], client_train_flops(world),
                 scn.clients.deadline_s, scn.seed, trace)


def client_train_flops(world: Any) -> list[float]:
    """Each client's local-training FLOPs in the scenario's training setting: one forward and
    backward pass of one sample of its architecture, times ``steps · batch_size``, or
    ``epochs ·`` its data size."""
    per_sample = {arch: train_flops_per_sample(world.new_model(arch, seed=0),
                                               world.data.input_shape)
                  for arch in world.groups}
    train = world.scenario.clients.train
    return [per_sample[arch] * (train.steps * train.batch_size if train.steps
                                else train.epochs * len(part))
            for arch, part in zip(world.archs, world.parts, strict=True)]


class ClockGrid(GridWrapper):
    """A grid wrapper that times each exchange on the clients' devices.

    Push/pull exchanges pass through untimed.

    Parameters
    ----------
    inner : AccountingGrid
        Counts the bytes the times are computed from (and is delegated everything else).
    clock : Clock
        Devices and virtual time.
    cid_of : Callable[[int], int]
        Client id of a node id.
    """

    def __init__(self, inner: Any, clock: Clock, cid_of: Callable[[int], int]) -> None:
        super().__init__(inner)
        self.clock = clock
        self.cid_of = cid_of

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send to the online nodes, time the exchange, turn stragglers into error replies."""
        msgs = list(messages)
        kinds = {m.metadata.message_type.split(".")[0] for m in msgs}
        if not msgs or kinds <= {"query"}:
            return self.inner.send_and_receive(msgs, timeout=timeout)
        rnd = max(server_round_of(m) for m in msgs)
        online = [m for m in msgs if self.clock.online(self.cid_of(m.metadata.dst_node_id), rnd)]
        self.clock.offline[rnd] = self.clock.offline.get(rnd, 0) + len(msgs) - len(online)
        before = {n: (t.down, t.up) for n, t in self.inner.traffic.items()}
        replies = list(self.inner.send_and_receive(online, timeout=timeout))
        times: dict[int, float] = {}
        for r in replies:
            node = r.metadata.src_node_id
            cid = self.cid_of(node)
            t = self.inner.traffic[node]
            down0, up0 = before.get(node, (0, 0))
            trained = r.metadata.message_type.startswith("train") and not r.has_error()
            times[cid] = self.clock.devices[cid].seconds(
                self.clock.flops[cid] if trained else 0.0, t.down - down0, t.up - up0)
        late = set(self.clock.exchange(rnd, times, train="train" in kinds))
        out = []
        for r in replies:
            node = r.metadata.src_node_id
            if self.cid_of(node) in late and not r.has_error():
                t = self.inner.traffic[node]
                up = t.up - before.get(node, (0, 0))[1]
                t.up -= up  # the upload never finished: it does not count
                self.inner.spent -= up
                t.failed = True
                r = Message(Error(ERROR_CODE_CLIENT, f"{STRAGGLER}: client {self.cid_of(node)} "
                                  f"missed the {self.clock.deadline:g} s deadline in round "
                                  f"{rnd}"), reply_to=_request(msgs, node))
            out.append(r)
        return out


def _request(msgs: list[Message], node: int) -> Message:
    return next(m for m in msgs if m.metadata.dst_node_id == node)
