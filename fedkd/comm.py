"""Communication accounting and tensor <-> Flower record conversion.

Byte counts are the sizes of the serialized array payloads (``Array.data``), i.e. what a
Flower message actually carries for its arrays; for NumPy-serialized arrays this includes the
small ``.npy`` header of each array.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

DIRECTIONS = ("down", "up")


def array_bytes(record: ArrayRecord) -> int:
    """Serialized payload size of every array in a record.

    Parameters
    ----------
    record : ArrayRecord
        Record to measure.

    Returns
    -------
    int
        Sum of ``len(arr.data)`` over the record's arrays.
    """
    return sum(len(arr.data) for arr in record.values())


def message_bytes(content: RecordDict) -> int:
    """Serialized array payload of a message's content (metrics and configs are not counted).

    Parameters
    ----------
    content : RecordDict
        Message content.

    Returns
    -------
    int
        Sum of :func:`array_bytes` over all ArrayRecords.
    """
    # the records themselves, not ``content.array_records`` (a filtered copy per access, a
    # few microseconds on the engines' per-message path)
    return sum(array_bytes(rec) for rec in content.values() if isinstance(rec, ArrayRecord))


@dataclass
class ByteLedger:
    """Bytes exchanged per round, client and direction (``"down"`` = server to client)."""

    entries: dict[tuple[int, int, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, round: int, client_id: int, direction: str, nbytes: int) -> None:
        """Add ``nbytes`` to the (round, client, direction) cell.

        Raises
        ------
        ValueError
            When ``direction`` is not ``"down"`` or ``"up"`` or ``nbytes`` is negative.
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be non-negative, got {nbytes}")
        self.entries[(int(round), int(client_id), direction)] += int(nbytes)

    def round_totals(self, round: int) -> tuple[int, int]:
        """Total ``(down, up)`` bytes of one round."""
        return self._totals(k for k in self.entries if k[0] == round)

    def per_client(self, round: int) -> dict[int, tuple[int, int]]:
        """``{client_id: (down, up)}`` for one round, sorted by client id."""
        cids = sorted({cid for r, cid, _ in self.entries if r == round})
        return {
            cid: (
                self.entries.get((round, cid, "down"), 0),
                self.entries.get((round, cid, "up"), 0),
            )
            for cid in cids
        }

    def cumulative(self) -> tuple[int, int]:
        """Total ``(down, up)`` bytes over all rounds."""
        return self._totals(self.entries)

    def _totals(self, keys: Iterable[tuple[int, int, str]]) -> tuple[int, int]:
        """Sum ``(down, up)`` over the given entry keys."""
        down = up = 0
        for key in keys:
            if key[2] == "down":
                down += self.entries[key]
            else:
                up += self.entries[key]
        return down, up


def _key(prefix: str, name: str) -> str:
    """``"<prefix>.<name>"``, or ``name`` without a prefix."""
    return f"{prefix}.{name}" if prefix else name


def state_dict_to_arrayrecord(sd: dict[str, torch.Tensor], prefix: str = "") -> ArrayRecord:
    """Convert a state dict to an ArrayRecord, preserving dtypes.

    Parameters
    ----------
    sd : dict[str, torch.Tensor]
        Tensors by name.
    prefix : str
        When non-empty, keys become ``"<prefix>.<name>"``.

    Returns
    -------
    ArrayRecord
        One NumPy-serialized Array per tensor, in the state dict's order.
    """
    record = ArrayRecord()
    for name, tensor in sd.items():
        record[_key(prefix, name)] = Array(tensor.detach().cpu().contiguous().numpy())
    return record


_NPY_MAGIC = b"\x93NUMPY"


def as_numpy(arr: Array) -> np.ndarray:
    """A read-only NumPy view of a serialized Array, without parsing its ``.npy`` header.

    Flower's ``Array.numpy()`` runs ``np.load``, whose header parsing (``ast.literal_eval``)
    costs more than the copy for the small arrays of a model; the Array already carries its
    dtype and shape, so only the header's length is read. Anything but a C-order ``.npy``
    payload falls back to ``Array.numpy()``.
    """
    data = arr.data
    if arr.stype != "numpy.ndarray" or not data.startswith(_NPY_MAGIC):
        return arr.numpy()
    if data[6] == 1:
        offset = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] in (2, 3):
        offset = 12 + int.from_bytes(data[8:12], "little")
    else:
        return arr.numpy()
    if b"'fortran_order': True" in data[:offset]:
        return arr.numpy()
    return np.frombuffer(data, dtype=np.dtype(arr.dtype), offset=offset).reshape(arr.shape)


def arrayrecord_to_state_dict(rec: ArrayRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert an ArrayRecord back to tensors.

    Parameters
    ----------
    rec : ArrayRecord
        Record of NumPy-serialized Arrays.
    prefix : str
        When non-empty, only keys ``"<prefix>.<name>"`` are returned, as ``name``.

    Returns
    -------
    dict[str, torch.Tensor]
        Writable CPU tensors with the original dtypes and shapes.
    """
    start = f"{prefix}." if prefix else ""
    return {
        key[len(start) :]: torch.from_numpy(np.array(as_numpy(arr), copy=True))
        for key, arr in rec.items()
        if key.startswith(start)
    }


def split_groups(arrays: ArrayRecord) -> dict[str, ArrayRecord]:
    """Split ``"<arch>.<param>"`` keys into one ArrayRecord per architecture (keys stripped).

    Heterogeneous model groups travel as one ArrayRecord whose keys carry the architecture.
    """
    groups: dict[str, dict[str, Array]] = {}
    for key, arr in arrays.items():
        arch, name = key.split(".", 1)
        groups.setdefault(arch, {})[name] = arr
    return {arch: ArrayRecord(items) for arch, items in groups.items()}


def join_groups(groups: dict[str, ArrayRecord]) -> ArrayRecord:
    """Inverse of :func:`split_groups`."""
    return ArrayRecord({f"{arch}.{k}": v for arch, rec in groups.items() for k, v in rec.items()})


class GridWrapper(Grid):
    """A Flower Grid around another: delegates every method; subclasses change some.

    Attributes the wrapper lacks are read from the inner grid too, so a stack of wrappers
    reads as the innermost grid (e.g. the byte counts of an accounting grid).
    """

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def set_run(self, run: Run) -> None:
        """Delegate to the inner grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Delegate to the inner grid."""
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Delegate to the inner grid."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate to the inner grid."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate to the inner grid."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate to the inner grid."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Delegate to the inner grid."""
        return self.inner.send_and_receive(messages, timeout=timeout)
