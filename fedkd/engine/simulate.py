"""``fedkd simulate``: build the world, open the run folder, run the rounds on an engine.

Three engines run the same ServerApp logic and ClientApp:

- ``ray`` (default): :class:`~fedkd.engine.ray_grid.RayGrid` over a pool of Ray actors,
  local or attached to a cluster (``engine.ray_address``: ``auto`` or ``ray://host:port``);
- ``flower``: Flower's own simulation runtime (``flwr.simulation.run_simulation``);
- ``inline``: every client in the driver process, one after another
  (:class:`~fedkd.engine.inline.InlineGrid`; no Ray, for debugging and small machines).

Ray and Flower log to ``engine.log`` in the run folder unless ``verbose``. Ray is always shut
down when the run ends or fails, so no Ray process outlives the command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from fedkd import checkpoint
from fedkd.checkpoint import from_safe, load_strategy_state, strategy_state
from fedkd.client import WorldSource
from fedkd.compose import check_resources, client_app, prepare
from fedkd.engine.recorder import RunRecorder
from fedkd.engine.runner import run_rounds
from fedkd.ensemble import TeacherEnsemble
from fedkd.errors import ScenarioError
from fedkd.scenario import EngineConfig, Scenario, dump
from fedkd.train import keep_freed_memory
from fedkd.world import World, install_world


def new_run_dir(scn: Scenario, out: str | None) -> Path:
    """``<out>/<scenario name>/<timestamp>/``, made unique and created."""
    base = Path(out or scn.output.dir) / scn.name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, n = base / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = base / f"{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


@contextlib.contextmanager
def engine_logs(run_dir: Path, verbose: bool) -> Iterator[None]:
    """Send Flower's, Ray's and Python warnings' log records to ``engine.log``."""
    if verbose:
        yield
        return
    handler = logging.FileHandler(run_dir / "engine.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    names = ("flwr", "ray", "py.warnings", "fedkd")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
             for n in names}
    logging.captureWarnings(True)
    for n in names:
        lg = logging.getLogger(n)
        lg.handlers = [handler]
        lg.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        for n, (handlers, propagate) in saved.items():
            logging.getLogger(n).handlers = handlers
            logging.getLogger(n).propagate = propagate
        logging.captureWarnings(False)
        handler.close()


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so a stopped run closes its records and Ray."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def single_node_ray() -> Iterator[None]:
    """Start local Ray in its single-node mode, so that every Ray process binds to loopback.

    On Linux, Ray resolves even ``node_ip_address="127.0.0.1"`` to the machine's address and
    its GCS server, raylet, workers and agents listen on all interfaces; an unauthenticated
    Ray reachable from the network runs anyone's code. Ray's single-node mode (its default on
    macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) uses 127.0.0.1 for the node,
    and every Ray listener then binds there (``tests/test_security.py`` checks each one).
    The flag is read when Ray is first imported, so the already-imported constant is set too;
    both are restored afterwards (a later run may attach to a cluster).
    """
    import ray._private.ray_constants as constants

    key = constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = constants.ENABLE_RAY_CLUSTER, os.environ.get(key)
    constants.ENABLE_RAY_CLUSTER = False
    os.environ[key] = "0"
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved[0]
        if saved[1] is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved[1]


@contextlib.contextmanager
def ray_session(engine: EngineConfig, verbose: bool) -> Iterator[None]:
    """Start local Ray (or attach to ``engine.ray_address``); always shut it down after."""
    import ray

    import fedkd
    import strategies

    args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose,
                            "logging_level": logging.INFO if verbose else logging.ERROR}
    with contextlib.ExitStack() as local:
        if engine.ray_address:
            ray.init(address=engine.ray_address,
                     runtime_env={"py_modules": [fedkd, strategies]}, **args)
        else:
            local.enter_context(single_node_ray())
            # "local": a new instance even where a `ray start` cluster (or its stale address
            # file) exists on this machine
            ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1",
                     **args)
        interrupt_on_sigterm()  # ray.init installs its own handler, which aborts the driver
        try:
            have = ray.cluster_resources()
            check_resources(engine.client_resources,
                            {"num_cpus": have.get("CPU", 0.0), "num_gpus": have.get("GPU", 0.0)},
                            "the Ray cluster" if engine.ray_address else "this machine")
            yield
        finally:
            TeacherEnsemble.shutdown()
            ray.shutdown()


def run_on_ray(world: World, source: WorldSource, engine: EngineConfig,
               loop: Callable[[Grid], Any], verbose: bool) -> None:
    """Run ``loop`` over a RayGrid of ``engine.actors`` actors (default: one per CPU)."""
    import ray

    from fedkd.engine.ray_grid import RayGrid
    from fedkd.state import StateStore, copy_store, start_state_actor

    cpus = ray.cluster_resources().get("CPU", 1)
    actors = engine.actors or max(1, int(cpus // engine.client_resources.num_cpus))
    holder = start_state_actor(source.run_dir) if source.state_store == "actor" else None
    restored = Path(source.run_dir) / "state"  # a resumed run's checkpointed client states
    if holder is not None and restored.is_dir():
        copy_store(StateStore(restored), source.store())
        shutil.rmtree(restored)
    grid = RayGrid(world, source, actors=min(actors, world.num_clients),
                   num_cpus=engine.client_resources.num_cpus,
                   num_gpus=engine.client_resources.num_gpus,
                   start_timeout=engine.start_timeout)
    try:
        loop(grid)
    finally:
        grid.shutdown()
        if holder is not None:
            ray.kill(holder)


def run_on_flower(world: World, source: WorldSource, engine: EngineConfig,
                  loop: Callable[[Grid], Any], verbose: bool) -> None:
    """Run ``loop`` as the ServerApp of Flower's own simulation runtime (on the same Ray)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        loop(grid)

    resources = {"num_cpus": engine.client_resources.num_cpus,
                 "num_gpus": engine.client_resources.num_gpus}
    run_simulation(server_app=app, client_app=client_app(source),
                   num_supernodes=world.num_clients,
                   backend_config={"client_resources": resources}, verbose_logging=verbose)


def run_inline(world: World, source: WorldSource, engine: EngineConfig,
               loop: Callable[[Grid], Any], verbose: bool) -> None:
    """Run ``loop`` over the in-process grid: every client in this process."""
    from fedkd.engine.inline import InlineGrid

    loop(InlineGrid(world, source))


ENGINES = {"ray": run_on_ray, "flower": run_on_flower, "inline": run_inline}


def resume_state(run_dir: Path, strategy: Any) -> dict[str, Any]:
    """Load ``run_dir``'s checkpoint and put the strategy's server state back.

    Raises
    ------
    ScenarioError
        When the folder has no checkpoint.
    """
    if not (run_dir / "checkpoint" / "state.pt").is_file():
        raise ScenarioError("--resume", str(run_dir), "a run folder with a checkpoint "
                            "(the run needs checkpoint_every > 0 and one finished checkpoint)")
    state = checkpoint.load(run_dir)
    load_strategy_state(strategy, state["strategy"])
    return state


def simulate(scn: Scenario, out: str | None = None, metrics_port: int | None = None,
             verbose: bool = False, progress: bool = True,
             run_dir: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Run a scenario end to end and return its summary.

    Parameters
    ----------
    scn : Scenario
        The resolved scenario.
    out : str, optional
        Folder for runs (default: ``scn.output.dir``).
    metrics_port : int, optional
        Serve Prometheus metrics on ``127.0.0.1:<port>``.
    verbose : bool
        Let Ray's and Flower's logs through to the terminal.
    progress : bool
        Show the progress bar.
    run_dir : str, optional
        Exact run folder (default: a new ``<out>/<scenario>/<timestamp>/``).
    resume : bool
        Continue the run in ``run_dir`` from its checkpoint (:mod:`fedkd.checkpoint`).
    """
    if scn.server.threads:
        torch.set_num_threads(scn.server.threads)
    keep_freed_memory()  # the server trains too (distillation, generators)
    world, strategy = prepare(scn)  # every pre-run check, before any folder exists
    install_world(world)
    state = resume_state(Path(run_dir), strategy) if resume and run_dir else None
    target = Path(run_dir) if run_dir else None
    base = (target.parent if target else Path(out or scn.output.dir) / scn.name).absolute()
    made = [p for p in (base, *base.parents) if not p.exists()]  # removed if it never starts
    done = int(state["round"]) if state else 0
    run_dir = target or new_run_dir(scn, out)  # type: ignore[assignment]
    run_dir.mkdir(parents=True, exist_ok=True)
    source = WorldSource(dump(scn), str(run_dir.resolve()), threads=scn.engine.threads,
                         state_store=scn.engine.state_store)
    never_started = False
    try:
        with engine_logs(run_dir, verbose):
            recorder = RunRecorder(world, run_dir, strategy, metrics_port=metrics_port,
                                   progress=progress, resume_round=done)
            arrays = None if state is None else from_safe(state["arrays"], None)

            def save(run: dict[str, Any]) -> None:
                checkpoint.save(run_dir, {**run, "strategy": strategy_state(strategy)},
                                source.store())
            status = "failed"
            ends: list[str] = []
            try:
                session = (contextlib.nullcontext() if scn.engine.name == "inline"
                           else ray_session(scn.engine, verbose))
                with session:
                    ENGINES[scn.engine.name](
                        world, source, scn.engine,
                        lambda grid: ends.append(run_rounds(
                            world, strategy, grid, recorder, arrays, done + 1, state,
                            save).status), verbose)
                status = ends[-1] if ends else "failed"
            except KeyboardInterrupt:
                status = "interrupted"
                raise
            except ScenarioError:  # the engine refused the scenario before the first round
                never_started = state is None
                raise
            finally:
                summary = recorder.close(status)
    finally:
        if never_started:
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in made:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return summary
