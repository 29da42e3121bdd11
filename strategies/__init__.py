"""Federated (distillation) algorithms, one Flower message-API strategy per file.

A strategy is registered by name with ``@STRATEGIES.register("name")``. A file dropped in this
package whose module name is the strategy's name is imported on first use, so a researcher
adds an algorithm by adding ``strategies/<name>.py`` and naming it in YAML.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedkd.registry import Registry

if TYPE_CHECKING:
    from fedkd.scenario import Scenario
    from fedkd.world import World

STRATEGIES: Registry[Any] = Registry("strategy")

#: Constructor arguments fedkd fills from the scenario (not settable in ``strategy.params``).
STRATEGY_CONTEXT_ARGS = ("fraction_train", "min_train_nodes", "min_available_nodes", "seed")


def get_strategy(name: str) -> Any:
    """The strategy class registered as ``name``, importing ``strategies.<name>`` if needed."""
    if name not in STRATEGIES and name.isidentifier():
        try:
            importlib.import_module(f"strategies.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"strategies.{name}":
                raise
    return STRATEGIES.get(name, "strategy.name")


def build_strategy(scn: Scenario, world: World | None = None) -> Any:
    """Instantiate the scenario's strategy with its params and the participation settings.

    When ``world`` is given it is bound to the strategy (server-side data such as the proxy
    and validation splits, and how to build each architecture).
    """
    cls = get_strategy(scn.strategy.name)
    strategy = cls(fraction_train=scn.clients.fraction, min_train_nodes=scn.clients.min_clients,
                   min_available_nodes=scn.clients.num, seed=scn.seed, **scn.strategy.params)
    if world is not None and hasattr(strategy, "bind"):
        strategy.bind(world)
    return strategy


from strategies import (  # noqa: E402,F401  (registers the built-in strategies)
    dml,
    fedavg,
    feddf,
    fedftg,
    fedgen,
    fedmd,
    fml,
    local,
)
