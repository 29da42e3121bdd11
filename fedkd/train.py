"""The one training loop and evaluation every algorithm calls.

Data are in-memory tensors indexed by seeded permutations (no DataLoader, no per-sample
transforms), so a client's local update is a tight loop of ``index -> forward -> step``.

On the CPU a convolutional model trains and predicts with its 4-d weights in channels-last
layout (:func:`cpu_layout`), and goes back to the standard layout when done. oneDNN's
standard-layout (NCHW) convolutions run 2 to 4 times slower on this project's reference CPU
(AMD EPYC, AVX-512) for most placements of their output buffer relative to their input
(4K aliasing between the kernel's loads and stores), so their speed changed from process to
process with the allocator's history; channels-last kernels ran at full speed for every
placement tried (cnn_small local update 1.2x, cnn_medium 1.75x, prediction 1.4x to 2x
faster). Results differ from the standard layout only by float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.scenario import TrainConfig


@dataclass(frozen=True)
class FitResult:
    """What one call of :func:`fit` did."""

    loss: float
    steps: int
    examples: int


def batch_indices(n: int, batch_size: int, generator: torch.Generator, *, epochs: int = 1,
                  steps: int | None = None) -> Iterator[torch.Tensor]:
    """Yield index batches: a fresh seeded permutation per epoch.

    Parameters
    ----------
    n : int
        Number of samples.
    batch_size : int
        Samples per batch (the last batch of an epoch may be smaller; a lone leftover
        sample is dropped, since BatchNorm cannot train on a batch of one).
    generator : torch.Generator
        Seeded generator: the same seed gives the same batches.
    epochs : int
        Passes over the data, used when ``steps`` is None.
    steps : int, optional
        Exact number of batches, cycling through fresh permutations.
    """
    if n == 0:
        return
    done = 0
    epoch = 0
    while (steps is None and epoch < epochs) or (steps is not None and done < steps):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = perm[start:start + batch_size]
            if len(idx) == 1 and batch_size > 1 and n > 1:
                continue
            yield idx
            done += 1
            if steps is not None and done >= steps:
                return
        epoch += 1


@contextlib.contextmanager
def cpu_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, a model on the CPU with standard-layout 4-d weights holds them in
    channels-last layout; on leaving it they are standard again (a no-op on other devices,
    for models without 4-d weights, and inside an outer block that already converted).

    Parameters stay the same ``Parameter`` objects (their data are replaced), so an
    optimizer made before the block keeps working; the values are unchanged.
    """
    weights = [p for p in model.parameters() if p.dim() == 4 and p.device.type == "cpu"]
    if not weights or all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer,
        batches: Iterator[torch.Tensor], step_loss: Callable[[torch.Tensor], torch.Tensor],
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> FitResult:
    """Run optimisation steps: for each index batch, ``loss = step_loss(idx)``, backward, step.

    Parameters
    ----------
    model : nn.Module
        The model being trained (put in train mode).
    optimizer : torch.optim.Optimizer
        Its optimizer.
    batches : Iterator[torch.Tensor]
        Index batches, e.g. from :func:`batch_indices`.
    step_loss : Callable
        Maps an index batch to a scalar loss (the algorithm's objective).
    scheduler : LRScheduler, optional
        Stepped once per batch.

    Raises
    ------
    FloatingPointError
        When the loss becomes non-finite: training diverged, and the model must not be sent
        (a client that raises replies with an error and is left out of aggregation).
    """
    model.train()
    total, steps, examples = 0.0, 0, 0
    with cpu_layout(model):
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged: loss {float(loss)} at step {steps}")
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(idx)
            examples += len(idx)
            steps += 1
    return FitResult(loss=total / max(examples, 1), steps=steps, examples=examples)


#: glibc ``mallopt`` parameters and the values :func:`keep_freed_memory` gives them.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 << 20, 64 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed tensor memory in the process instead of handing it back
    to the kernel after every training step.

    glibc serves a block from its heap only below an mmap threshold, and gives the heap's free
    top back to the kernel past a trim threshold; both start small and grow only as the
    process frees large blocks. A process that does nothing but train a small CNN (a client
    actor) never frees a large one, so each step's few-MB activations were given back and
    faulted in again: 82,000 page faults in 50 ``cnn_small`` steps, and client updates 7 %
    slower than in a process that had once evaluated with large batches. Fixed thresholds
    (32 MB, glibc's largest mmap threshold, and 64 MB) make every process behave like the
    latter (0 to 1,400 faults in the same steps).

    Returns
    -------
    bool
        Whether both thresholds were set (False where the C library has no ``mallopt``).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def warm_up() -> None:
    """Import what torch's first optimizer imports lazily (``torch._dynamo``, about 2 s on
    this machine), so that an engine pays it while starting, not inside its first round
    (the inline grid and every Ray client actor call it; a server that trains pays it in
    its first round)."""
    import torch._dynamo  # noqa: F401


def sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """The local optimizer: SGD with momentum and weight decay from the scenario."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def train_supervised(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                     seed: int,
                     extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     ) -> FitResult:
    """Local supervised training: cross-entropy plus an optional algorithm-specific term.

    Parameters
    ----------
    model : nn.Module
        Client model, trained in place.
    x, y : torch.Tensor
        The client's data.
    cfg : TrainConfig
        Optimiser and schedule.
    seed : int
        Seeds the batch order.
    extra_loss : Callable, optional
        ``extra_loss(idx, logits) -> Tensor`` added to the cross-entropy (e.g. FedGen's
        generator regulariser or a mutual-learning KL term).
    """
    gen = torch.Generator().manual_seed(seed)
    dev = device_of(model)

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = model(x[idx].to(dev, non_blocking=True))
        loss = F.cross_entropy(logits, y[idx].to(dev, non_blocking=True))
        if extra_loss is not None:
            loss = loss + extra_loss(idx, logits)
        return loss

    batches = batch_indices(len(y), cfg.batch_size, gen, epochs=cfg.epochs, steps=cfg.steps)
    return fit(model, sgd(model, cfg), batches, step_loss)


def device_of(model: nn.Module) -> torch.device:
    """The device a model's parameters live on (CPU for a parameterless model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


#: Most rows of one forward pass of :func:`predict` on the CPU.
CPU_PREDICT_ROWS = 64


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode, batched, returned on the CPU.

    On the CPU the forward passes take at most :data:`CPU_PREDICT_ROWS` rows whatever
    ``batch_size`` asks: a 1024-row pass of a convolutional model spills its activations
    out of the caches. On the reference CPU, 2,000 Fashion-MNIST images took 1.9x
    (``cnn_small``) to 2.7x (``cnn_medium``, ``resnet8``) longer in passes of 1024 than of
    64, and CIFAR-shaped images 2x to 3x; MLPs do not care. In eval mode every row's
    logits are computed on their own, so the result is the same (bit for bit in every
    model measured).
    """
    model.eval()
    if len(x) == 0:
        return torch.empty(0)
    dev = device_of(model)
    rows = min(batch_size, CPU_PREDICT_ROWS) if dev.type == "cpu" else batch_size
    with cpu_layout(model):
        return torch.cat([model(x[i:i + rows].to(dev)).cpu() for i in range(0, len(x), rows)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``.

    Returns
    -------
    tuple[float, float]
        ``(loss, accuracy)``; ``(nan, nan)`` on empty data.
    """
    if len(y) == 0:
        return float("nan"), float("nan")
    return scores(predict(model, x, batch_size), y)


def scores(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``logits`` against labels ``y`` (non-empty)."""
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc
