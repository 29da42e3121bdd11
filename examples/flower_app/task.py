"""The model and data of the example: an MLP on scikit-learn's digits, split across clients.

Everything a Flower user would write anyway; nothing here comes from fedkd.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

NUM_CLASSES = 10
SEED = 0


def Net() -> nn.Module:  # noqa: N802 - named like the class a Flower template defines
    """A small MLP for the 8x8 digits."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, NUM_CLASSES))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def server_data() -> dict[str, np.ndarray]:
    """The server's unlabeled proxy inputs, labeled validation split and test split."""
    x, y = _digits()
    return {"proxy": x[:200], "val_x": x[200:300], "val_y": y[200:300],
            "test_x": x[300:600], "test_y": y[300:600]}


def client_data(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``partition_id``'s private data: a label-skewed share of the remaining digits.

    Half of each client's share is a run of label-sorted digits (a few classes), half is
    drawn at random from all classes.
    """
    x, y = _digits()
    x, y = x[600:], y[600:]
    half = len(y) // 2
    skewed = np.argsort(y[:half], kind="stable")
    mixed = np.arange(half, len(y))
    part = np.concatenate([np.array_split(skewed, num_partitions)[partition_id],
                           np.array_split(mixed, num_partitions)[partition_id]])
    return torch.from_numpy(x[part]), torch.from_numpy(y[part])


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> float:
    """Plain SGD on the client's data; returns the last epoch's mean loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(SEED)
    loss_sum = 0.0
    for _ in range(epochs):
        loss_sum = 0.0
        for idx in torch.randperm(len(y), generator=gen).split(32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss) * len(idx)
    return loss_sum / len(y)


def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Top-1 accuracy."""
    with torch.no_grad():
        pred = model(torch.as_tensor(x)).argmax(1)
    return float((pred == torch.as_tensor(y)).float().mean())
