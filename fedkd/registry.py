"""One generic registry for every pluggable kind (datasets, partitioners, models, strategies).

YAML names a component; the registry turns that name into the callable that builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from fedkd.errors import ScenarioError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> component mapping for one kind of component.

    Parameters
    ----------
    kind : str
        What the registry holds ("dataset", "model", ...), used in error messages.
    loader : Callable[[str | None], None], optional
        Imports the module that registers ``name`` (``None``: every module that may register
        something), for registries whose components register themselves on import.
    """

    def __init__(self, kind: str, loader: Callable[[str | None], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader

    def register(self, name: str) -> Callable[[T], T]:
        """Return a decorator that registers its argument under ``name``."""

        def decorator(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str, path: str = "") -> T:
        """Return the component called ``name``.

        Parameters
        ----------
        name : str
            Registered name.
        path : str
            YAML key path used in the error when the name is unknown.

        Raises
        ------
        ScenarioError
            When no component of that name exists.
        """
        if name not in self._items and self._loader is not None:
            self._loader(name)
        if name not in self._items:
            raise ScenarioError(path or self.kind, name, f"one of {self.names()}")
        return self._items[name]

    def names(self) -> list[str]:
        """Registered names, sorted (loading every component first, if there is a loader)."""
        if self._loader is not None:
            self._loader(None)
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
