"""In-memory tensor containers shared by every dataset loader."""

from __future__ import annotations

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
