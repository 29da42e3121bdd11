"""Composition: where a scenario meets the registries, the algorithms and the machine.

Configuration (:mod:`fedkd.scenario`) and the ClientApp (:mod:`fedkd.client`) know nothing of
the algorithms; this module is what ``fedkd simulate`` and ``fedkd validate`` call to

- load a scenario and validate the whole of it, every registered name and its params
  included (:func:`load_scenario`, :func:`from_dict`, :func:`validate`);
- check that the machine (or Ray cluster) can give what the scenario asks for;
- build the strategy and bind it to the world (:func:`build_strategy`);
- load the strategy's client handlers and build the ClientApp (:func:`client_app`);
- run every check ``simulate`` runs before the first round (:func:`prepare`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from fedkd.budget import Budgeted
from fedkd.client import WorldSource, make_client_app
from fedkd.data.datasets import DATASETS
from fedkd.data.partition import PARTITIONERS
from fedkd.errors import ScenarioError
from fedkd.faults import fault_mod
from fedkd.models import MODELS
from fedkd.scenario import Resources, Scenario, check_kwargs, parse_scenario, read_scenario
from fedkd.wire import make_wire, wire_mod
from fedkd.world import World, build_world
from strategies import STRATEGY_CONTEXT_ARGS, get_strategy


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Load a scenario file, apply ``a.b.c=value`` overrides, and validate all of it."""
    scn = read_scenario(path, overrides)
    validate(scn)
    return scn


def from_dict(raw: Mapping[str, Any]) -> Scenario:
    """Parse and validate a raw scenario mapping (registered component params included)."""
    scn = parse_scenario(raw)
    validate(scn)
    return scn


def validate(scn: Scenario) -> None:
    """Check every registered name of the scenario and its params."""
    loader = DATASETS.get(scn.data.name, "data.name")
    check_kwargs(loader, scn.data.params, "data.params", skip=("root", "download", "seed"))
    if scn.data.public.dataset is not None:
        DATASETS.get(scn.data.public.dataset, "data.public.dataset")
    part = PARTITIONERS.get(scn.partition.name, "partition.name")
    check_kwargs(part, scn.partition.params, "partition.params",
                 skip=("labels", "num_clients", "num_classes", "seed"))
    for i, spec in enumerate(scn.clients.models):
        builder = MODELS.get(spec.arch, f"clients.models.{i}.arch")
        check_kwargs(builder, spec.params, f"clients.models.{i}.params",
                     skip=("input_shape", "num_classes"))
    strategy = get_strategy(scn.strategy.name)
    check_kwargs(strategy, scn.strategy.params, "strategy.params", skip=STRATEGY_CONTEXT_ARGS)
    make_wire(scn.comm, scn.seed)
    if scn.server.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ScenarioError("server.device", "cuda", "cpu or auto (no CUDA device here)")


def check_resources(asked: Resources, available: Mapping[str, float], where: str) -> None:
    """Fail at once when one client actor asks for more than the machine or cluster has.

    Parameters
    ----------
    asked : Resources
        ``engine.client_resources`` of one actor.
    available : Mapping[str, float]
        What there is, e.g. ``{"num_cpus": 2, "num_gpus": 0}``.
    where : str
        "this machine" or "the Ray cluster", for the message.

    Raises
    ------
    ScenarioError
        Naming ``engine.client_resources.<key>``, the value and what ``where`` has.
    """
    for key, value in dataclasses.asdict(asked).items():
        have = float(available.get(key, 0.0))
        if value > have:
            unit = {"num_cpus": "CPUs", "num_gpus": "GPUs"}.get(key, key)
            raise ScenarioError(f"engine.client_resources.{key}", value,
                                f"at most {have:g} ({where} has {have:g} {unit})")


def local_resources() -> dict[str, float]:
    """CPUs and CUDA GPUs of this machine."""
    import os

    import torch

    return {"num_cpus": float(os.cpu_count() or 1),
            "num_gpus": float(torch.cuda.device_count() if torch.cuda.is_available() else 0)}


def build_strategy(scn: Scenario, world: World | None = None) -> Any:
    """Instantiate the scenario's strategy with its params and the participation settings.

    When ``world`` is given it is bound to the strategy (server-side data such as the proxy
    and validation splits, and how to build each architecture), which is also where a
    strategy rejects a world it cannot run in (e.g. FedDF without proxy data).
    """
    cls = get_strategy(scn.strategy.name)
    strategy = cls(fraction_train=scn.clients.fraction, min_train_nodes=scn.clients.min_clients,
                   min_available_nodes=scn.clients.num, seed=scn.seed, **scn.strategy.params)
    if world is not None and hasattr(strategy, "bind"):
        strategy.bind(world)
    budget = scn.comm.budget
    if budget.round_mb is not None or budget.total_mb is not None:
        # peers on a graph (an ``edge_log``) are budgeted over the graph's edges
        strategy = Budgeted(strategy, budget.round_mb, budget.total_mb, budget.policy, scn.seed,
                            on_edges=hasattr(strategy, "edge_log"))
    return strategy


def client_app(source: WorldSource) -> ClientApp:
    """The ClientApp of a run: loads the scenario's strategy so its client handlers exist.

    Importing the strategy's module registers its client functions (also for a strategy file
    a researcher dropped into ``strategies/``).
    """
    get_strategy(source.scenario().strategy.name)
    return make_client_app(source, mods=client_mods(source))


def client_mods(source: WorldSource) -> list[Any]:
    """The ClientApp mods of a run: failure injection, then the wire's codecs when active."""
    scn = source.scenario()
    wire = make_wire(scn.comm, scn.seed)
    return [fault_mod, *([wire_mod(wire, source.store)] if wire.active else [])]


def prepare(scn: Scenario) -> tuple[World, Any]:
    """Every check ``simulate`` runs before the first round; returns the world and strategy.

    Builds the world (data, partition, models), checks the local resources (a Ray cluster's
    are checked when the run attaches to it), builds and binds the strategy and builds its
    initial global model.
    """
    from fedkd.trackers import check_trackers

    check_trackers(scn.output)
    if scn.engine.state_store == "actor" and scn.engine.name != "ray":
        raise ScenarioError("engine.state_store", "actor",
                            "disk unless engine.name is ray (the state actor lives on Ray)")
    if scn.engine.batched and scn.engine.name == "flower":
        raise ScenarioError("engine.batched", True, "false unless engine.name is inline or ray "
                            "(Flower's runtime hands the ClientApp one message at a time)")
    if scn.engine.ray_address is None:
        check_resources(scn.engine.client_resources, local_resources(), "this machine")
    world = build_world(scn)
    strategy = build_strategy(scn, world)
    if hasattr(strategy, "initial_arrays"):
        strategy.initial_arrays(world)
    return world, strategy
