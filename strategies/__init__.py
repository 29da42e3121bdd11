"""Federated (distillation) algorithms, one Flower message-API strategy per file.

A strategy is registered by name with ``@STRATEGIES.register("name")`` in the module
``strategies/<name>.py``, which is imported on first use: a researcher adds an algorithm by
adding the file and naming it in YAML. This package imports none of its algorithms itself,
so configuration and the engine never depend on them (:mod:`fedkd.compose` brings the two
together).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from fedkd.registry import Registry

#: Constructor arguments fedkd fills from the scenario and the world (not settable in
#: ``strategy.params``; ``proxy``, ``validation`` and ``model_fn`` are for plain Flower apps).
STRATEGY_CONTEXT_ARGS = ("fraction_train", "min_train_nodes", "min_available_nodes", "seed",
                         "proxy", "validation", "model_fn")


def load_module(name: str | None) -> None:
    """Import ``strategies.<name>`` (every module of the package when ``name`` is None).

    A name that is no module of the package is left for the registry to report.
    """
    names = [m.name for m in pkgutil.iter_modules(__path__)] if name is None else [name]
    for module in names:
        if not module.isidentifier():
            continue
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise


STRATEGIES: Registry[Any] = Registry("strategy", loader=load_module)


def get_strategy(name: str) -> Any:
    """The strategy class registered as ``name``, importing ``strategies.<name>`` if needed."""
    return STRATEGIES.get(name, "strategy.name")
