"""Errors a user can act on: each names the YAML key path, the bad value and what is allowed."""

from __future__ import annotations


class ScenarioError(ValueError):
    """A bad scenario value, reported as one line.

    Parameters
    ----------
    path : str
        Dotted YAML key path, e.g. ``partition.params.alpha``.
    value : object
        The offending value.
    allowed : str
        What would have been accepted.
    """

    def __init__(self, path: str, value: object, allowed: str) -> None:
        self.path = path
        self.value = value
        self.allowed = allowed
        super().__init__(f"{path}: got {value!r}; allowed: {allowed}")


class DataUnavailableError(RuntimeError):
    """A dataset is not on disk and may not be downloaded; the message says where to get it."""
