"""fedkd's benchmark suite: engine overhead and real federated work, as ratios.

Run with ``python -m benchmarks.run`` (``make bench``); ``--quick`` is a smoke version that
runs in a couple of minutes. Every number (raw seconds per round, medians, ratios, targets,
pass/fail, machine info) goes to ``--out`` (JSON, default ``benchmarks/results.json``) and a
Markdown table next to it (``results.md``). A missed target is reported, not fatal.

What is measured
----------------
1. **Engine overhead.** 100 clients that do nothing: each round the server sends a
   ``"query.ping"`` message (empty ``RecordDict``) to every node through
   ``grid.send_and_receive`` and waits for all replies; 1 warm-up round, then the median
   seconds per round of

   - fedkd's :class:`~fedkd.engine.ray_grid.RayGrid` (2 actors) inside ``ray_session``;
   - Flower's own simulation engine (``flwr.simulation.run_simulation``, one ClientApp actor
     per CPU), whose ServerApp runs the same loop after all 100 nodes have registered.

   Both run fedkd's ClientApp (:func:`fedkd.compose.client_app`) on a tiny ``synthetic``
   world. Target: ``flower / fedkd >= 100``.

2. **Real work.** FedAvg on Fashion-MNIST (``cnn_small``, 1 local epoch, batch 32, every
   client every round); median seconds per round (first round = warm-up, excluded) of

   - **P1 / P2**: the honest hand-written baseline, one process with
     ``torch.set_num_threads(1)`` / ``(2)``: the same world (data, partition, initial model,
     batch seeds), for each client load the global weights, ``train_supervised``, keep the
     state dict; weighted average; ``evaluate`` on the test set;
   - **F1**: ``fedkd simulate`` with 1 actor, 1 torch thread per actor, 1 server thread;
   - **F2**: ``fedkd simulate`` with 2 actors, 1 torch thread per actor, all server threads;

   with per-round ``wall_s`` read from the run's ``metrics.parquet`` (same scope as P: train,
   aggregate, central evaluation). Each configuration runs twice, first in the order P1 F1
   P2 F2, then F1 P1 F2 P2, and its timed rounds are pooled: this machine's speed drifts by
   10 to 20 % over minutes, which one run of each used to put into the ratios. Targets:
   ``F1/P1 <= 1.03`` (the engine costs at most 3 % over a bare loop), ``F2/P2 <= 0.80``
   (two actors beat two torch threads by 20 %) and ``F2 / (P1 / 2) <= 1.05`` (two actors
   within 5 % of perfect two-process scaling). P1's and F1's final accuracies must agree
   within 0.02 (the same work was done).

3. **Message layer.** FedAvg as in 2 (1 actor), without a codec and with fp16 both ways,
   each run as often as the real-work configurations, in alternating order (C0 C16, then
   C16 C0), timed rounds pooled. Target: ``C16 / C0 <= 1.05``.

4. **Teacher diagnostics.** FedDF on the same data (20 % public proxy, 5 % validation,
   the default 200 distillation steps with early stopping), 1 actor, with
   ``server.teacher_diagnostics`` off (**D0**) and on (**D1**), median seconds per round.
   Round times differ by a few per cent from run to run on a shared machine, so the target
   is checked on the diagnostics' own cost, timed in this process on the same shapes (every
   teacher's logits on the proxy and validation splits): ``diagnostics / D0 <= 0.10``;
   ``D1 / D0`` is reported beside it.

5. **Batched local training** (``--only batched``). FedAvg on Fashion-MNIST with 100
   clients, every client every round (1 epoch, batch 32), on the inline engine (1 torch
   thread), ``mlp`` and ``cnn_small``, with ``engine.batched`` off (**BM0**, **BC0**) and on
   (**BM1**, **BC1**); median seconds per round. Target, per model:
   ``one by one / batched >= 3``. Beside it, the local training alone (``--only
   batched-train``, in one process, no Flower): one round of the same 100 clients' updates
   (random data of Fashion-MNIST's shape), ``train_supervised`` client by client against one
   ``train_batched`` call (its default grouping: all clients on a GPU, 16 at a time on the
   CPU), with the largest weight difference between the two (about 1e-8,
   except where a float32 near-tie in max-pooling or ReLU breaks differently for a client:
   then up to about 1e-3 for that client; in float64 the two agree to 1e-16). The clients
   train on ``--device``: ``cpu``, or ``cuda`` (then the rounds' scenario gives clients the
   GPU, ``engine.client_resources.num_gpus: 1``). Beside each ratio, its **compute
   ceiling**: the updates' matmul and convolution FLOPs (``torch.utils.flop_counter``, one
   by one, counted once) at the device's rate for a 1024 x 1024 x 1024 float32 matmul take
   ``floor_s``; no grouping of the same updates can beat one by one by more than
   ``one by one / floor_s``. Where that ceiling is under 3, the target cannot be met on
   that device.

Every configuration runs in its own subprocess (so torch thread settings, Ray and Flower state
do not leak between them), compared pairs close together on this shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results.json"
CHILD_TIMEOUT_S = 1200.0


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run (full or quick).

    Attributes
    ----------
    ping_clients, ping_rounds, ping_warmup : int
        Engine overhead: nodes, timed rounds, untimed warm-up rounds.
    train_limit, test_limit : int
        Fashion-MNIST samples kept (seeded subsets).
    clients : int
        FedAvg clients (all of them train every round).
    rounds : int
        FedAvg rounds, the first of which is a warm-up excluded from the medians.
    batched_clients : int
        Clients of the batched-training benchmark.
    real_repeats : int
        Runs of each real-work configuration, in alternating order (their timed rounds pooled).
    """

    ping_clients: int = 100
    ping_rounds: int = 20
    ping_warmup: int = 1
    train_limit: int = 12000
    test_limit: int = 2000
    clients: int = 20
    rounds: int = 5
    batched_clients: int = 100
    real_repeats: int = 2


FULL = Settings()
QUICK = Settings(ping_rounds=2, train_limit=2000, test_limit=500, clients=10, rounds=3,
                 real_repeats=1)


@dataclass(frozen=True)
class Target:
    """A pass/fail criterion on one measured ratio or difference."""

    name: str
    op: str
    bound: float

    def check(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def text(self) -> str:
        """E.g. ``>= 5``."""
        return f"{self.op} {self.bound:g}"


OVERHEAD_TARGET = Target("engine overhead: flower / fedkd (s per round)", ">=", 100.0)
F1_TARGET = Target("real work, 1 core: F1 / P1 (s per round)", "<=", 1.03)
F2_TARGET = Target("real work, 2 cores: F2 / P2 (s per round)", "<=", 0.80)
F2_SCALING_TARGET = Target("real work, 2 actors: F2 / (P1 / 2) (s per round)", "<=", 1.05)
ACC_TARGET = Target("final accuracy |P1 - F1|", "<=", 0.02)
COMM_TARGET = Target("message layer: fp16 both ways / no codec (s per round)", "<=", 1.05)
DIAG_TARGET = Target("teacher diagnostics / FedDF round (s)", "<=", 0.10)


def batched_target(arch: str, what: str) -> Target:
    """``one by one / batched >= 3`` for ``arch`` (``what``: the scope of the timing)."""
    return Target(f"batched training, {arch}, {what}: one by one / batched", ">=", 3.0)


# ----------------------------------------------------------------------------- scenarios


def overhead_scenario(num_clients: int) -> dict[str, Any]:
    """A tiny synthetic world with ``num_clients`` clients (builds in milliseconds)."""
    return {
        "name": "bench_overhead", "seed": 0, "rounds": 1,
        "data": {"name": "synthetic",
                 "params": {"train_size": 10 * num_clients, "test_size": 100}},
        "partition": {"name": "iid"},
        "clients": {"num": num_clients, "models": [{"arch": "mlp"}]},
        "strategy": {"name": "fedavg"},
        "engine": {"name": "ray", "actors": 2},
    }


def fmnist_scenario(s: Settings) -> dict[str, Any]:
    """FedAvg on Fashion-MNIST, every client every round, 1 local epoch."""
    return {
        "name": "bench_fmnist", "seed": 0, "rounds": s.rounds, "eval_every": 1,
        "data": {"name": "fashion_mnist",
                 "params": {"train_limit": s.train_limit, "test_limit": s.test_limit}},
        "partition": {"name": "iid"},
        "clients": {"num": s.clients, "fraction": 1.0, "models": [{"arch": "cnn_small"}],
                    "train": {"lr": 0.05, "momentum": 0.9, "epochs": 1, "batch_size": 32}},
        "strategy": {"name": "fedavg"},
    }


def feddf_scenario(s: Settings) -> dict[str, Any]:
    """FedDF on the real-work data: 20 % of it a proxy split, 5 % a validation split."""
    raw = fmnist_scenario(s)
    raw["name"] = "bench_feddf"
    raw["data"] = {**raw["data"], "public": {"fraction": 0.2}, "val_fraction": 0.05}
    raw["strategy"] = {"name": "feddf"}
    return raw


def batched_scenario(s: Settings, arch: str, device: str = "cpu") -> dict[str, Any]:
    """FedAvg on Fashion-MNIST with ``batched_clients`` clients of ``arch``, inline engine;
    the clients train on the GPU when ``device`` is ``cuda``."""
    raw = fmnist_scenario(s)
    raw["name"] = f"bench_batched_{arch}"
    raw["clients"] = {**raw["clients"], "num": s.batched_clients, "models": [{"arch": arch}]}
    raw["engine"] = {"name": "inline",
                     "client_resources": {"num_gpus": 1 if device.startswith("cuda") else 0}}
    return raw


#: fedkd configurations of the real-work benchmark: ``--set`` overrides per name.
FEDKD_CONFIGS: dict[str, list[str]] = {
    "F1": ["engine.actors=1", "engine.threads=1", "server.threads=1"],
    "F2": ["engine.actors=2", "engine.threads=1", "server.threads=0"],
    # the message layer's cost: F1 again, and F1 with fp16 both ways
    "C0": ["engine.actors=1", "engine.threads=1", "server.threads=1"],
    "C16": ["engine.actors=1", "engine.threads=1", "server.threads=1",
            "comm.down.codec=fp16", "comm.up.codec=fp16"],
    # FedDF without and with the teacher diagnostics
    "D0": ["engine.actors=1", "engine.threads=1", "server.threads=1",
           "server.teacher_diagnostics=false"],
    "D1": ["engine.actors=1", "engine.threads=1", "server.threads=1",
           "server.teacher_diagnostics=true"],
    # batched local training: mlp (BM) and cnn_small (BC), one by one (0) and batched (1)
    **{f"B{m}{b}": ["engine.name=inline", "engine.threads=1", "server.threads=1",
                    f"engine.batched={'true' if b else 'false'}"]
       for m in ("M", "C") for b in (0, 1)},
}

#: The models of the batched-training benchmark and the letter of their configurations.
BATCHED_ARCHS = {"mlp": "M", "cnn_small": "C"}


# ----------------------------------------------------------------------------- helpers


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence (``nan`` when empty)."""
    return statistics.median(xs) if xs else float("nan")


def machine_info() -> dict[str, Any]:
    """CPU count, load, library versions and the date of this run."""
    import torch

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "flwr": version("flwr"),
        "ray": version("ray"),
    }


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def wait_quiet(seconds: float, log: Callable[[str], None]) -> None:
    """Wait at most ``seconds`` until the 1-minute load average is below the CPU count."""
    deadline = time.monotonic() + seconds
    cpus = os.cpu_count() or 1
    load = loadavg()
    if load is None or load < cpus or seconds <= 0:
        return
    log(f"  load average {load:.1f} >= {cpus} CPUs: waiting for a quieter machine")
    while time.monotonic() < deadline and (load := loadavg() or 0.0) >= cpus:
        time.sleep(5)
    log(f"  load average now {load:.1f}")


def run_child(args: list[str], log: Path, timeout: float = CHILD_TIMEOUT_S) -> float:
    """Run ``python <args>`` from the repository root, output to ``log``; return its seconds.

    The child gets its own process group, which is killed on timeout (Ray's helpers too).
    """
    return run_child_peak(args, log, timeout, sample=False)[0]


def session_memory(sid: int) -> tuple[int, int]:
    """Resident and proportional set sizes summed over every process of session ``sid``.

    RSS counts a page shared by several processes (torch's libraries, Ray's object store)
    once in each of them; PSS splits it among them (Linux ``smaps_rollup``), so the PSS sum
    is the memory the processes take together.
    """
    rss = pss = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid:  # field 6 of stat: the session id
                continue
            rss += int(fields[21]) * page  # field 24: resident pages
            for line in Path(f"/proc/{entry}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue
    return rss, pss


def run_child_peak(args: list[str], log: Path, timeout: float = CHILD_TIMEOUT_S,
                   sample: bool = True) -> tuple[float, int, int]:
    """:func:`run_child`, and (``sample``) the peak resident and proportional set sizes
    summed over the child and every process it started (Ray's too, :func:`session_memory`),
    sampled every 0.1 s; 0 when not sampled."""
    start = time.perf_counter()
    peak = peak_pss = 0
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if sample:
                rss, pss = session_memory(proc.pid)
                peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            left = timeout - (time.perf_counter() - start)
            try:  # returns as soon as the child exits
                proc.wait(timeout=max(0.0, min(0.1, left)) if sample else max(0.0, left))
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start < timeout:
                    continue
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"{' '.join(args)} timed out after {timeout:.0f} s "
                                   f"(log: {log})") from None
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{tail}")
    return time.perf_counter() - start, peak, peak_pss


def run_benchmark_child(kind: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run one ``--child`` configuration of this module in a subprocess; return its result."""
    spec_path, out_path = work / f"{kind}.spec.json", work / f"{kind}.out.json"
    spec_path.write_text(json.dumps(spec))
    tag = spec.get("tag", kind)
    before = loadavg()
    seconds = run_child(["-m", "benchmarks.run", "--child", kind, "--spec", str(spec_path),
                         "--child-out", str(out_path)], work / f"{tag}.log")
    result = json.loads(out_path.read_text())
    result.update(process_s=seconds, loadavg_before=before, loadavg_after=loadavg())
    return result


# ----------------------------------------------------------------------------- children


def ping_rounds(grid: Any, node_ids: Sequence[int], warmup: int, rounds: int) -> list[float]:
    """Send ``query.ping`` to every node and wait for all replies; seconds per timed round.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        Any Flower grid.
    node_ids : Sequence[int]
        The nodes to ping.
    warmup, rounds : int
        Untimed and timed rounds.
    """
    from flwr.app import Message, RecordDict

    times = []
    for r in range(warmup + rounds):
        start = time.perf_counter()
        msgs = [Message(RecordDict(), dst_node_id=nid, message_type="query.ping")
                for nid in node_ids]
        replies = list(grid.send_and_receive(msgs))
        elapsed = time.perf_counter() - start
        errors = [rep.error.reason for rep in replies if rep.has_error()]
        if len(replies) != len(node_ids) or errors:
            raise RuntimeError(f"round {r}: {len(replies)} replies from {len(node_ids)} nodes, "
                               f"errors: {errors[:3]}")
        if r >= warmup:
            times.append(elapsed)
    return times


def wait_for_nodes(grid: Any, n: int, timeout: float = 300.0) -> list[int]:
    """Wait until ``n`` nodes are registered (Flower's nodes register asynchronously)."""
    deadline = time.monotonic() + timeout
    while len(ids := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(ids)} of {n} nodes registered")
        time.sleep(0.05)
    return ids


def child_overhead(spec: dict[str, Any], engine: str) -> dict[str, Any]:
    """Engine overhead of one engine (``fedkd`` or ``flower``) on the ping world."""
    from fedkd.client import WorldSource
    from fedkd.compose import client_app, from_dict
    from fedkd.engine.simulate import engine_logs, ray_session
    from fedkd.scenario import dump
    from fedkd.world import build_world, install_world

    scn = from_dict(spec["scenario"])
    world = build_world(scn)
    install_world(world)
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    source = WorldSource(scenario_yaml=dump(scn), run_dir=str(run_dir))
    warmup, rounds, n = spec["warmup"], spec["rounds"], world.num_clients
    out: dict[str, Any] = {}
    start = time.perf_counter()
    with engine_logs(run_dir, verbose=False), ray_session(scn.engine, verbose=False):
        if engine == "fedkd":
            from fedkd.engine.ray_grid import RayGrid

            grid = RayGrid(world, source, actors=2)  # sets Flower's TaskIdentity
            try:
                out["startup_s"] = time.perf_counter() - start
                out["seconds"] = ping_rounds(grid, sorted(grid.get_node_ids()), warmup, rounds)
            finally:
                grid.shutdown()
        else:
            from flwr.serverapp import Grid, ServerApp
            from flwr.simulation import run_simulation

            app = ServerApp()

            @app.main()
            def main(grid: Grid, context: Any) -> None:
                ids = wait_for_nodes(grid, n)
                out["startup_s"] = time.perf_counter() - start
                out["seconds"] = ping_rounds(grid, ids, warmup, rounds)

            run_simulation(server_app=app, client_app=client_app(source),
                           num_supernodes=n,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
                           verbose_logging=False)
    if "seconds" not in out:
        raise RuntimeError(f"the {engine} engine finished without running the ping rounds")
    return out


def average_states(states: Sequence[dict[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """Weighted mean of state dicts in float64, cast back to each tensor's dtype."""
    import torch

    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for sd, w in zip(states, weights, strict=True):
            acc += (w / total) * sd[key].to(torch.float64)
        if not first.is_floating_point():
            acc = acc.round()
        out[key] = acc.to(first.dtype)
    return out


def child_plain(spec: dict[str, Any]) -> dict[str, Any]:
    """The hand-written single-process FedAvg loop with ``spec["threads"]`` torch threads.

    Uses fedkd's world (same data, partition, initial model) and fedkd's batch seeds
    (:func:`fedkd.client.seed_for`), so it does exactly the SGD steps fedkd's clients do.
    """
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from fedkd.client import seed_for
    from fedkd.compose import from_dict
    from fedkd.train import evaluate, train_supervised
    from fedkd.world import build_world

    start = time.perf_counter()
    scn = from_dict(spec["scenario"])
    world = build_world(scn)
    arch = world.groups[0]
    state = world.new_model(arch, seed=scn.seed * 1000).state_dict()
    model = world.new_model(arch, seed=0)
    data = [world.client_data(cid) for cid in range(world.num_clients)]
    test = world.data.test
    cfg = scn.clients.train
    startup = time.perf_counter() - start
    seconds: list[float] = []
    cpu: list[float] = []
    accs: list[float] = []
    for rnd in range(1, scn.rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        states, weights = [], []
        for cid, d in enumerate(data):
            model.load_state_dict(state)
            train_supervised(model, d.x, d.y, cfg, seed=seed_for(scn.seed, rnd, cid, 0))
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(float(len(d)))
        state = average_states(states, weights)
        model.load_state_dict(state)
        _, acc = evaluate(model, test.x, test.y, scn.server.eval_batch_size)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        accs.append(acc)
    return {"seconds": seconds, "cpu_s": cpu, "acc": accs, "startup_s": startup,
            "threads": torch.get_num_threads()}


def device_timed(dev: Any, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds on ``dev``, the work it queued on a GPU included."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def gemm_peak(dev: Any, n: int = 1024, repeats: int = 5) -> float:
    """This device's float32 matrix-multiply rate (FLOP/s, best of ``repeats`` n x n x n
    products at the current thread count): the most any training step can reach."""
    import torch

    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    best = min(device_timed(dev, lambda: a @ b)[1] for _ in range(repeats + 1))
    return 2 * n**3 / best


def child_batched_train(spec: dict[str, Any]) -> dict[str, Any]:
    """One round of local training of ``spec["clients"]`` clients of ``spec["arch"]`` on
    ``spec["device"]``: ``train_supervised`` client by client (each update copied back to the
    CPU, as a client's reply is) against one ``train_batched`` call; one untimed warm-up,
    then ``spec["repeats"]`` timed repetitions of each, alternating."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from fedkd.batched import train_batched
    from fedkd.models import build_model
    from fedkd.scenario import TrainConfig
    from fedkd.train import train_supervised

    dev = torch.device(spec["device"])
    shape, k, n = tuple(spec["shape"]), int(spec["clients"]), int(spec["samples"])
    gen = torch.Generator().manual_seed(0)
    datas = [(torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen))
             for _ in range(k)]
    cfg = TrainConfig(**spec["train"])
    model = build_model(spec["arch"], shape, 10, seed=0).to(dev)
    start = {key: v.detach().cpu().clone() for key, v in model.state_dict().items()}
    seeds = list(range(k))

    def one_by_one() -> list[dict[str, Any]]:
        states = []
        for (x, y), seed in zip(datas, seeds, strict=True):
            model.load_state_dict(start)
            train_supervised(model, x, y, cfg, seed)
            states.append({key: v.detach().cpu().clone() for key, v in model.state_dict().items()})
        return states

    def batched() -> list[dict[str, Any]]:
        outcomes = train_batched(model, [start] * k, datas, cfg, seeds)
        return [o[0] for o in outcomes if not isinstance(o, Exception)]

    times: dict[str, list[float]] = {"one_by_one": [], "batched": []}
    states: dict[str, list[dict[str, Any]]] = {}
    for rep in range(1 + int(spec["repeats"])):
        for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
            states[name], seconds = device_timed(dev, fn)
            if rep:
                times[name].append(seconds)
    diff = max(float((a[key] - b[key]).abs().max())
               for a, b in zip(states["one_by_one"], states["batched"], strict=True) for key in a)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # the same updates, counted once
        one_by_one()
    return {"one_by_one_s": times["one_by_one"], "batched_s": times["batched"],
            "flops": int(counter.get_total_flops()), "peak_flops_s": gemm_peak(dev),
            "max_abs_diff": diff, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- parent side


def run_fedkd(name: str, yaml_path: Path, work: Path, tag: str | None = None,
              ) -> dict[str, Any]:
    """``fedkd simulate`` in a subprocess with the overrides of ``name`` (its run folder and
    log named ``tag``, default ``name``); per-round records."""
    import pyarrow.parquet as pq

    tag = tag or name
    out_dir = work / f"runs_{tag}"
    args = ["-m", "fedkd.cli", "simulate", str(yaml_path), "--out", str(out_dir),
            "--no-progress"]
    for o in FEDKD_CONFIGS[name]:
        args += ["--set", o]
    before = loadavg()
    seconds = run_child(args, work / f"{tag}.log")
    after = loadavg()
    (metrics,) = out_dir.glob("*/*/metrics.parquet")
    rows = sorted(pq.read_table(metrics).to_pylist(), key=lambda r: r["round"])
    summary = json.loads((metrics.parent / "summary.json").read_text())
    return {"seconds": [float(r["wall_s"]) for r in rows],
            "acc": [float(r["acc"]) for r in rows],
            "process_s": seconds, "run_wall_s": summary["wall_s"],
            "loadavg_before": before, "loadavg_after": after,
            "overrides": FEDKD_CONFIGS[name]}


def timing_entry(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Raw per-round seconds, the warm-up rounds and the median of the timed ones."""
    timed = raw["seconds"][warmup:]
    entry = {**raw, "warmup_s": raw["seconds"][:warmup], "timed_s": timed,
             "median_s": median(timed)}
    if "acc" in raw:
        entry["final_acc"] = raw["acc"][-1]
    return entry


def check(target: Target, value: float, **extra: Any) -> dict[str, Any]:
    """A recorded pass/fail line."""
    return {"name": target.name, "value": value, "target": target.text(),
            "pass": bool(target.check(value)), **extra}


def bench_overhead(s: Settings, work: Path, log: Callable[[str], None],
                   quiet: float = 0.0) -> dict[str, Any]:
    """Benchmark 1: ping rounds on RayGrid vs Flower's simulation engine."""
    spec = {"scenario": overhead_scenario(s.ping_clients), "warmup": s.ping_warmup,
            "rounds": s.ping_rounds}
    res: dict[str, Any] = {"clients": s.ping_clients, "warmup_rounds": s.ping_warmup,
                           "timed_rounds": s.ping_rounds}
    for engine in ("fedkd", "flower"):
        log(f"engine overhead: {engine} ({s.ping_clients} clients, "
            f"{s.ping_warmup}+{s.ping_rounds} rounds)")
        wait_quiet(quiet, log)
        raw = run_benchmark_child(f"overhead-{engine}",
                                  {**spec, "run_dir": str(work / f"ping_{engine}")}, work)
        res[engine] = {**raw, "timed_s": raw["seconds"], "median_s": median(raw["seconds"])}
        log(f"  median {res[engine]['median_s'] * 1e3:.1f} ms per round")
    res["ratio"] = res["flower"]["median_s"] / res["fedkd"]["median_s"]
    res["check"] = check(OVERHEAD_TARGET, res["ratio"],
                         detail=f"{res['flower']['median_s'] * 1e3:.1f} ms vs "
                                f"{res['fedkd']['median_s'] * 1e3:.1f} ms per round")
    return res


def bench_real_work(s: Settings, work: Path, log: Callable[[str], None],
                    quiet: float = 0.0) -> dict[str, Any]:
    """Benchmark 2: FedAvg on Fashion-MNIST, plain loops vs fedkd, 1 and 2 cores."""
    from fedkd.compose import from_dict
    from fedkd.scenario import dump

    raw = fmnist_scenario(s)
    yaml_path = work / "bench_fmnist.yaml"
    yaml_path.write_text(dump(from_dict(raw)))
    res: dict[str, Any] = {"scenario": raw, "warmup_rounds": 1, "timed_rounds": s.rounds - 1}
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(s.real_repeats):  # P1 F1 P2 F2, then F1 P1 F2 P2: drift hits both
        order = ("P1", "F1", "P2", "F2") if rep % 2 == 0 else ("F1", "P1", "F2", "P2")
        for name in order:
            log(f"real work: {name} ({rep + 1} of {s.real_repeats})")
            wait_quiet(quiet, log)
            if name.startswith("P"):
                out = run_benchmark_child("plain", {"scenario": raw, "threads": int(name[1]),
                                                    "tag": f"{name}_{rep}"}, work)
            else:
                out = run_fedkd(name, yaml_path, work, tag=f"{name}_{rep}")
            entry = timing_entry(out, warmup=1)
            runs.setdefault(name, []).append(entry)
            log(f"  median {entry['median_s']:.2f} s per round "
                f"(timed {', '.join(f'{x:.2f}' for x in entry['timed_s'])}), "
                f"final acc {entry['final_acc']:.4f}")
    res.update({name: pooled(entries) for name, entries in runs.items()})
    f1 = res["F1"]["median_s"] / res["P1"]["median_s"]
    f2 = res["F2"]["median_s"] / res["P2"]["median_s"]
    acc_diff = abs(res["P1"]["final_acc"] - res["F1"]["final_acc"])
    res["checks"] = [
        check(F1_TARGET, f1, detail=f"{res['F1']['median_s']:.2f} s vs "
                                    f"{res['P1']['median_s']:.2f} s per round"),
        check(F2_TARGET, f2, detail=f"{res['F2']['median_s']:.2f} s vs "
                                    f"{res['P2']['median_s']:.2f} s per round"),
        check(F2_SCALING_TARGET, res["F2"]["median_s"] / (res["P1"]["median_s"] / 2),
              detail=f"{res['F2']['median_s']:.2f} s vs {res['P1']['median_s'] / 2:.2f} s "
                     f"(half of P1) per round"),
        check(ACC_TARGET, acc_diff, detail=f"P1 {res['P1']['final_acc']:.4f}, "
                                           f"F1 {res['F1']['final_acc']:.4f}, "
                                           f"P2 {res['P2']['final_acc']:.4f}, "
                                           f"F2 {res['F2']['final_acc']:.4f}"),
    ]
    return res


def pooled(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The timing entries of one configuration's runs as one: timed and warm-up rounds
    pooled, their median, the last run's other fields."""
    timed = [x for e in entries for x in e["timed_s"]]
    return {**entries[-1], "timed_s": timed, "median_s": median(timed),
            "warmup_s": [x for e in entries for x in e["warmup_s"]], "repeats": len(entries)}


def run_configs(title: str, raw: dict[str, Any], names: Sequence[str], s: Settings,
                work: Path, log: Callable[[str], None], quiet: float,
                repeats: int = 1) -> dict[str, Any]:
    """``fedkd simulate`` of scenario ``raw`` under each of the :data:`FEDKD_CONFIGS`
    ``names``, one after the other, ``repeats`` times in alternating order (``names``, then
    reversed: drift hits every configuration alike); their pooled timing entries (first
    round of each run a warm-up)."""
    from fedkd.compose import from_dict
    from fedkd.scenario import dump

    yaml_path = work / f"{raw['name']}_{names[0]}.yaml"
    yaml_path.write_text(dump(from_dict(raw)))
    res: dict[str, Any] = {"scenario": raw, "warmup_rounds": 1, "timed_rounds": s.rounds - 1}
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            log(f"{title}: {name}" + (f" ({rep + 1} of {repeats})" if repeats > 1 else ""))
            wait_quiet(quiet, log)
            entry = timing_entry(run_fedkd(name, yaml_path, work, tag=f"{name}_{rep}"),
                                 warmup=1)
            runs.setdefault(name, []).append(entry)
            log(f"  median {entry['median_s']:.2f} s per round, "
                f"final acc {entry['final_acc']:.4f}")
    res.update({name: pooled(entries) for name, entries in runs.items()})
    return res


def bench_comm(s: Settings, work: Path, log: Callable[[str], None],
               quiet: float = 0.0) -> dict[str, Any]:
    """Benchmark 3: what encoding and decoding every message (fp16 both ways) adds to a
    FedAvg round on Fashion-MNIST, against the same run without a codec."""
    res = run_configs("message layer", fmnist_scenario(s), ("C0", "C16"), s, work, log, quiet,
                      repeats=s.real_repeats)
    ratio = res["C16"]["median_s"] / res["C0"]["median_s"]
    res["check"] = check(COMM_TARGET, ratio,
                         detail=f"{res['C16']['median_s']:.2f} s vs {res['C0']['median_s']:.2f} "
                                f"s per round; final acc {res['C16']['final_acc']:.4f} vs "
                                f"{res['C0']['final_acc']:.4f}")
    return res


def time_diagnostics(raw: dict[str, Any], repeats: int = 5) -> dict[str, Any]:
    """Median seconds of one round's diagnostics (proxy and validation ensembles, uniform
    weights) on random logits of the scenario's shapes, in this process, 1 thread."""
    import torch

    from fedkd.compose import from_dict
    from fedkd.diagnostics import TeacherLog
    from fedkd.world import build_world

    torch.set_num_threads(1)
    world = build_world(from_dict(raw))
    k, c = raw["clients"]["num"], world.data.num_classes
    assert world.data.public is not None and world.data.val is not None
    cids = list(range(k))
    gen = torch.Generator().manual_seed(0)
    shapes = {"proxy": world.data.public.y, "val": world.data.val.y}
    inputs = {s: (torch.randn(k, len(y), c, generator=gen), torch.full((len(y), k), 1 / k), y)
              for s, y in shapes.items()}
    times = []
    for _ in range(repeats):
        log = TeacherLog()
        t0 = time.perf_counter()
        for source, (logits, weights, y) in inputs.items():
            log.record(1, cids, logits, weights, y, ensemble="logits", source=source,
                       per_class=source != "val")
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "median_s": median(times), "teachers": k,
            "proxy": len(shapes["proxy"]), "val": len(shapes["val"])}


def bench_diagnostics(s: Settings, work: Path, log: Callable[[str], None],
                      quiet: float = 0.0) -> dict[str, Any]:
    """Benchmark 4: the teacher diagnostics' cost against a FedDF round."""
    raw = feddf_scenario(s)
    res = run_configs("teacher diagnostics", raw, ("D0", "D1"), s, work, log, quiet)
    res["diagnostics"] = time_diagnostics(raw)
    cost = res["diagnostics"]["median_s"] / res["D0"]["median_s"]
    res["check"] = check(DIAG_TARGET, cost, detail=(
        f"{res['diagnostics']['median_s'] * 1e3:.1f} ms of a {res['D0']['median_s']:.2f} s "
        f"round ({res['diagnostics']['teachers']} teachers, {res['diagnostics']['proxy']} "
        f"proxy + {res['diagnostics']['val']} val samples); D1/D0 "
        f"{res['D1']['median_s'] / res['D0']['median_s']:.3f}; final acc "
        f"{res['D1']['final_acc']:.4f} vs {res['D0']['final_acc']:.4f}"))
    return res


def bench_batched(s: Settings, work: Path, log: Callable[[str], None], quiet: float = 0.0,
                  device: str = "cpu", engine: bool = True) -> dict[str, Any]:
    """Benchmark 5: batched local training against one by one, per model: FedAvg rounds on
    the inline engine (``engine``) and the local training alone, clients on ``device``."""
    res: dict[str, Any] = {"clients": s.batched_clients, "device": device}
    checks = []
    for arch, letter in BATCHED_ARCHS.items():
        entry: dict[str, Any] = {}
        if engine:
            one, many = f"B{letter}0", f"B{letter}1"
            runs = run_configs(f"batched training, {arch}", batched_scenario(s, arch, device),
                               (one, many), s, work, log, quiet)
            ratio = runs[one]["median_s"] / runs[many]["median_s"]
            runs["check"] = check(
                batched_target(arch, f"FedAvg round, inline engine, {device}"), ratio,
                detail=f"{runs[one]['median_s']:.2f} s vs {runs[many]['median_s']:.2f} s per "
                       f"round; final acc {runs[one]['final_acc']:.4f} vs "
                       f"{runs[many]['final_acc']:.4f}")
            checks.append(runs["check"])
            entry["engine"] = runs
        log(f"batched training, {arch}: local training only, on {device}")
        wait_quiet(quiet, log)
        spec = {"arch": arch, "device": device, "clients": s.batched_clients,
                "samples": s.train_limit // s.batched_clients, "shape": [1, 28, 28],
                "train": {"lr": 0.05, "momentum": 0.9, "epochs": 1, "batch_size": 32},
                "threads": 1, "repeats": 3, "tag": f"batched-train-{arch}"}
        raw = run_benchmark_child("batched-train", spec, work)
        train = {**raw, "spec": spec, "one_by_one_median_s": median(raw["one_by_one_s"]),
                 "batched_median_s": median(raw["batched_s"])}
        ratio = train["one_by_one_median_s"] / train["batched_median_s"]
        # the compute ceiling: the updates' matmul and convolution FLOPs at this device's GEMM
        # rate take `floor_s`; no way of grouping them can beat one by one by more than
        # one_by_one / floor_s
        train["floor_s"] = raw["flops"] / raw["peak_flops_s"]
        train["ceiling"] = train["one_by_one_median_s"] / train["floor_s"]
        train["check"] = check(
            batched_target(arch, f"local training only, {device}"), ratio,
            detail=f"{train['one_by_one_median_s']:.3f} s vs {train['batched_median_s']:.3f} s "
                   f"for {s.batched_clients} clients' updates"
                   f"{' on ' + raw['device_name'] if raw['device_name'] else ''}; "
                   f"max weight difference {raw['max_abs_diff']:.1e}; compute ceiling "
                   f"{train['ceiling']:.1f}x ({raw['flops'] / 1e9:.1f} GFLOP at the "
                   f"{raw['peak_flops_s'] / 1e9:.0f} GFLOP/s of a 1024^3 matmul)")
        log(f"  {train['check']['detail']}")
        checks.append(train["check"])
        entry["train"] = train
        res[arch] = entry
    res["checks"] = checks
    return res


POP_SIZES = (100, 1_000, 10_000, 100_000)
POP_ENGINES = ("inline", "ray")


def pop_targets(engine: str) -> tuple[Target, Target, Target]:
    """The population targets of one fedkd engine."""
    return (Target(f"population ({engine}): 100,000 / 1,000 clients (s per round, first "
                   "included)", "<=", 1.25),
            Target(f"population ({engine}): peak memory at 100,000 clients (GB PSS, all "
                   "processes)", "<=", 4.0),
            Target(f"population ({engine}): start-up at 100,000 clients (s)", "<=", 60.0))


def population_scenario(n: int, engine: str, rounds: int = 20) -> dict[str, Any]:
    """FedAvg on ``synthetic`` data, 20 samples per client, 100 clients a round (all of them
    below 100)."""
    return {
        "name": f"pop{n}", "seed": 0, "rounds": rounds, "eval_every": 1,
        "data": {"name": "synthetic", "params": {"train_size": 20 * n, "test_size": 2000}},
        "partition": {"name": "iid"},
        "clients": {"num": n, "fraction": min(1.0, 100 / n), "models": [{"arch": "mlp"}],
                    "train": {"lr": 0.05, "epochs": 1, "batch_size": 16}},
        "strategy": {"name": "fedavg"},
        "engine": {"name": engine, "threads": 1},
    }


def bench_population(s: Settings, work: Path, log: Callable[[str], None],
                     quiet: float = 0.0) -> dict[str, Any]:
    """Benchmark 6: rounds/s, first round, start-up and peak memory (all processes) of
    FedAvg at 100 to 100,000 clients (100 a round) on the inline and Ray engines (2 actors on
    this machine), and on Flower's own simulation runtime where it fits (up to 1,000
    clients)."""
    import pyarrow.parquet as pq

    from fedkd.compose import from_dict
    from fedkd.scenario import dump

    sizes = POP_SIZES if s is FULL else POP_SIZES[:3]
    res: dict[str, Any] = {"sizes": list(sizes), "runs": {}}
    for engine in (*POP_ENGINES, "flower"):
        for n in sizes:
            if engine == "flower" and n > 1_000:
                continue
            name = f"{engine}-{n}"
            log(f"population: {name}")
            wait_quiet(quiet, log)
            yaml_path = work / f"pop_{name}.yaml"
            yaml_path.write_text(dump(from_dict(population_scenario(n, engine))))
            out_dir = work / f"runs_pop_{name}"
            seconds, peak, peak_pss = run_child_peak(
                ["-m", "fedkd.cli", "simulate", str(yaml_path), "--out", str(out_dir),
                 "--no-progress"], work / f"pop_{name}.log")
            (metrics,) = out_dir.glob("*/*/metrics.parquet")
            rounds = [float(r["wall_s"]) for r in sorted(pq.read_table(metrics).to_pylist(),
                                                         key=lambda r: r["round"])]
            run_s = json.loads((metrics.parent / "summary.json").read_text())["wall_s"]
            res["runs"][name] = {"clients": n, "engine": engine, "round_s": rounds,
                                 "mean_round_s": sum(rounds) / len(rounds),
                                 "first_round_s": rounds[0], "process_s": seconds,
                                 "startup_s": seconds - run_s, "peak_rss_gb": peak / 1e9,
                                 "peak_gb": peak_pss / 1e9}
            r = res["runs"][name]
            log(f"  {r['mean_round_s']:.2f} s per round (first {r['first_round_s']:.2f} s), "
                f"start-up {r['startup_s']:.1f} s, peak {r['peak_gb']:.2f} GB PSS "
                f"({r['peak_rss_gb']:.2f} GB RSS)")
    runs = res["runs"]
    res["checks"] = []
    for engine in POP_ENGINES:
        if f"{engine}-100000" not in runs:
            continue
        big, ref = runs[f"{engine}-100000"], runs[f"{engine}-1000"]
        rounds, memory, startup = pop_targets(engine)
        res["checks"] += [
            check(rounds, big["mean_round_s"] / ref["mean_round_s"],
                  detail=f"{big['mean_round_s']:.2f} s vs {ref['mean_round_s']:.2f} s per "
                         f"round; first rounds {big['first_round_s']:.2f} s vs "
                         f"{ref['first_round_s']:.2f} s"),
            check(memory, big["peak_gb"],
                  detail=f"proportional set size (shared pages split among the processes "
                         f"that map them); RSS summed {big['peak_rss_gb']:.2f} GB; "
                         f"{ref['peak_gb']:.2f} GB at 1,000 clients; "
                         + ("one process" if engine == "inline"
                            else "driver, 2 client actors and Ray's own processes")),
            check(startup, big["startup_s"],
                  detail=", ".join(f"{runs[f'{engine}-{n}']['startup_s']:.1f} s at {n:,}"
                                   for n in sizes)),
        ]
    return res


def fmt_value(c: dict[str, Any]) -> str:
    """A check's value for the tables."""
    return f"{c['value']:.4f}" if "accuracy" in c["name"] else f"{c['value']:.3f}"


def table(checks: Sequence[dict[str, Any]]) -> str:
    """Plain-text table of the checks."""
    rows = [("benchmark", "value", "target", "result", "detail")]
    rows += [(c["name"], fmt_value(c), c["target"], "PASS" if c["pass"] else "FAIL",
              c["detail"]) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(r[:4], widths, strict=True))
             + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def cell(text: str) -> str:
    """Escape a Markdown table cell."""
    return text.replace("|", "\\|")


def markdown(results: dict[str, Any]) -> str:
    """The Markdown report: checks, per-configuration medians and the machine."""

    def load(e: dict[str, Any]) -> str:
        before, after = e.get("loadavg_before"), e.get("loadavg_after")
        return "" if before is None else f"{before:.1f} → {after:.1f}"

    m = results["machine"]
    out = [f"# fedkd benchmarks ({results['mode']})", "",
           f"{m['date']} — {m['cpu_count']} CPUs, torch {m['torch']}, flwr {m['flwr']}, "
           f"ray {m['ray']}, Python {m['python']}", "",
           "| benchmark | value | target | result | detail |", "|---|---:|---|---|---|"]
    out += [f"| {cell(c['name'])} | {fmt_value(c)} | {c['target']} | "
            f"{'PASS' if c['pass'] else 'FAIL'} | {cell(c['detail'])} |"
            for c in results["checks"]]
    out += ["", "| configuration | median s/round | timed rounds (s) | final acc | load avg |",
            "|---|---:|---|---:|---|"]
    ov = results.get("engine_overhead", {})
    for engine in ("fedkd", "flower"):
        if engine in ov:
            e = ov[engine]
            out.append(f"| ping, {engine} | {e['median_s']:.4f} | "
                       f"{', '.join(f'{x:.4f}' for x in e['timed_s'])} | | {load(e)} |")
    rows = {**results.get("real_work", {}), **results.get("message_layer", {}),
            **results.get("teacher_diagnostics", {})}
    for arch in BATCHED_ARCHS:
        rows.update(results.get("batched", {}).get(arch, {}).get("engine", {}))
    for name in ("P1", "P2", "F1", "F2", "C0", "C16", "D0", "D1", *FEDKD_CONFIGS):
        if name in rows:
            e = rows.pop(name)
            out.append(f"| {name} | {e['median_s']:.3f} | "
                       f"{', '.join(f'{x:.2f}' for x in e['timed_s'])} | "
                       f"{e['final_acc']:.4f} | {load(e)} |")
    for arch in BATCHED_ARCHS:
        train = results.get("batched", {}).get(arch, {}).get("train")
        for how in ("one_by_one", "batched") if train else ():
            out.append(f"| local training, {arch}, {how.replace('_', ' ')} ({train['device']}) "
                       f"| {train[how + '_median_s']:.3f} | "
                       f"{', '.join(f'{x:.3f}' for x in train[how + '_s'])} | | "
                       f"{load(train)} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks (or, with ``--child``, one configuration of them)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast smoke version")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON (and .md next to it)")
    p.add_argument("--only", choices=["overhead", "real", "comm", "diagnostics", "population",
                                      "batched", "batched-train"],
                   help="run one benchmark only (batched-train: the local training part of "
                        "batched, which needs no Flower)")
    p.add_argument("--device", default="cpu",
                   help="device of the batched benchmark's local training (cpu or cuda)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each configuration, wait up to SECONDS for the 1-minute "
                        "load average to drop below the CPU count")
    p.add_argument("--child", choices=["overhead-fedkd", "overhead-flower", "plain",
                                       "batched-train"],
                   help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        if args.child == "plain":
            result = child_plain(spec)
        elif args.child == "batched-train":
            result = child_batched_train(spec)
        else:
            result = child_overhead(spec, args.child.removeprefix("overhead-"))
        Path(args.child_out).write_text(json.dumps(result))
        return 0

    settings = QUICK if args.quick else FULL
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {msg}", flush=True)

    results: dict[str, Any] = {"mode": "quick" if args.quick else "full",
                               "settings": asdict(settings),
                               "machine": machine_info()}
    checks: list[dict[str, Any]] = []
    load, cpus = loadavg(), os.cpu_count() or 1
    if load is not None and load >= cpus:
        log(f"warning: load average {load:.1f} on {cpus} CPUs before starting; other work "
            "on this machine makes the timings noisy")
    out = Path(args.out)
    md = out.with_suffix(".md")

    def save() -> None:
        """Write the JSON and Markdown reports (after each benchmark, so a stopped run keeps
        what it measured)."""
        results["checks"] = checks
        results["total_s"] = time.perf_counter() - began
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        md.write_text(markdown(results))

    with tempfile.TemporaryDirectory(prefix="fedkd-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "overhead"):
            results["engine_overhead"] = bench_overhead(settings, work, log, args.wait_quiet)
            checks.append(results["engine_overhead"]["check"])
            save()
        if args.only in (None, "real"):
            results["real_work"] = bench_real_work(settings, work, log, args.wait_quiet)
            checks += results["real_work"]["checks"]
            save()
        if args.only in (None, "comm"):
            results["message_layer"] = bench_comm(settings, work, log, args.wait_quiet)
            checks.append(results["message_layer"]["check"])
            save()
        if args.only in (None, "diagnostics"):
            results["teacher_diagnostics"] = bench_diagnostics(settings, work, log,
                                                               args.wait_quiet)
            checks.append(results["teacher_diagnostics"]["check"])
            save()
        if args.only in (None, "population"):
            results["population"] = bench_population(settings, work, log, args.wait_quiet)
            checks += results["population"].get("checks", [])
            save()
        if args.only in (None, "batched", "batched-train"):
            results["batched"] = bench_batched(settings, work, log, args.wait_quiet,
                                               args.device, engine=args.only != "batched-train")
            checks += results["batched"]["checks"]
            save()
    print()
    print(table(checks))
    print(f"\nresults: {out} and {md} ({results['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
