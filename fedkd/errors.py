"""Errors a user can act on: each names the YAML key path, the bad value and what is allowed."""

from __future__ import annotations


class ScenarioError(ValueError):
    """A bad scenario value, reported as one line.

    Parameters
    ----------
    path : str
        Dotted YAML key path, e.g. ``partition.params.alpha`` (or the file, for errors that
        concern the whole file).
    value : object
        The offending value.
    allowed : str
        What would have been accepted.
    shown : str, optional
        How to describe the value when its ``repr`` would not help (binary data, a file
        nested thousands of levels deep).
    """

    def __init__(self, path: str, value: object, allowed: str, *,
                 shown: str | None = None) -> None:
        self.path = path
        self.value = value
        self.allowed = allowed
        super().__init__(f"{path}: got {shown if shown is not None else repr(value)}; "
                         f"allowed: {allowed}")


class DataUnavailableError(RuntimeError):
    """A dataset is not on disk and may not be downloaded; the message says where to get it."""

