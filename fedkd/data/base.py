"""In-memory tensor containers shared by every dataset loader."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def _as_index(idx: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Convert an index array to an int64 tensor usable for indexing."""
    if isinstance(idx, torch.Tensor):
        return idx.to(dtype=torch.int64)
    return torch.from_numpy(np.asarray(idx, dtype=np.int64))


@dataclass(frozen=True)
class TensorSplit:
    """Features and labels of one split, held fully in memory.

    Attributes
    ----------
    x : torch.Tensor
        Float32 normalized inputs; images ``(N, C, H, W)``, tabular ``(N, D)``.
    y : torch.Tensor
        Int64 labels of shape ``(N,)``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"x has {self.x.shape[0]} samples but y has {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> TensorSplit:
        """Return the samples at positions ``idx``.

        Parameters
        ----------
        idx : numpy.ndarray or torch.Tensor
            Integer positions.

        Returns
        -------
        TensorSplit
            A new split holding copies of the selected rows.
        """
        index = _as_index(idx)
        return TensorSplit(self.x[index], self.y[index])

    def __reduce__(self) -> tuple[object, tuple[np.ndarray, np.ndarray]]:
        """Pickle as NumPy arrays: Ray shares them zero-copy between the processes of a node
        (a read-only view of its object store instead of one copy per actor); plain pickle
        copies them as usual."""
        return _split_from_arrays, (self.x.detach().cpu().numpy(), self.y.detach().cpu().numpy())


def _split_from_arrays(x: np.ndarray, y: np.ndarray) -> TensorSplit:
    """Unpickle a :class:`TensorSplit` (tensors over the arrays' memory, never written to)."""
    with warnings.catch_warnings():  # a read-only shared buffer: data splits are not written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return TensorSplit(torch.from_numpy(x), torch.from_numpy(y))


@dataclass(frozen=True, eq=False)
class Parts(Sequence[np.ndarray]):
    """Index arrays of a whole population as one flat array and offsets (CSR).

    ``parts[c]`` is client ``c``'s indices (a view). One object for 100,000 clients instead
    of 100,000 arrays: small to pickle, and shared zero-copy by Ray's object store.

    Attributes
    ----------
    flat : np.ndarray
        Every client's indices, client after client (int64).
    offsets : np.ndarray
        ``(n + 1,)`` int64; client ``c`` holds ``flat[offsets[c]:offsets[c + 1]]``.
    """

    flat: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, parts: Sequence[np.ndarray]) -> Parts:
        """Pack per-client index arrays."""
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = (np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if len(parts)
                else np.zeros(0, dtype=np.int64))
        return cls(flat, offsets)

    @property
    def sizes(self) -> np.ndarray:
        """Number of indices of every client."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, c: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= c < len(self):
            raise IndexError(f"client {c} of {len(self)}")
        c %= len(self)
        return self.flat[self.offsets[c]:self.offsets[c + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:],
                                                 strict=True))


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset after loading and normalization.

    Attributes
    ----------
    name : str
        Registry name of the dataset.
    train : TensorSplit
        Training split.
    test : TensorSplit
        Test split.
    num_classes : int
        Number of label classes.
    input_shape : tuple of int
        Shape of one sample, e.g. ``(1, 28, 28)`` or ``(20,)``.
    """

    name: str
    train: TensorSplit
    test: TensorSplit
    num_classes: int
    input_shape: tuple[int, ...]
