"""Batched local training: many clients' local SGD as one vectorised step.

:func:`train_batched` does for a list of clients of one architecture exactly what
:func:`fedkd.train.train_supervised` does for each of them (without ``extra_loss``), a group
of clients at a time (:data:`CPU_GROUP` on the CPU), with their
parameters stacked along a leading client axis and one ``torch.func.vmap`` of
``torch.func.grad_and_value`` over ``torch.func.functional_call`` per step:

- every client's batches are the ones :func:`~fedkd.train.batch_indices` draws from
  ``torch.Generator().manual_seed(seed)``, so each client sees the same samples in the same
  order as one by one;
- clients with fewer steps (less data, a ragged last batch, a dropped lone sample) are padded:
  a padded sample has weight 0 in its client's loss (a mean over the real samples only), and
  a client without a batch at a step takes no step (its parameters and momentum stay put);
- the update is ``torch.optim.SGD``'s (dampening 0, no Nesterov) written over the stacked
  tensors: ``d = g + weight_decay * p``; ``buf = momentum * buf + d`` (the zero-initialised
  buffer makes the first step ``buf = d``, as SGD's ``clone``); ``p = p - lr * buf``;
- the loss reported is :func:`~fedkd.train.fit`'s: the example-weighted mean of the step
  losses; a client whose loss turns non-finite stops there and gets the
  ``FloatingPointError`` :func:`~fedkd.train.fit` raises.

Results agree with one-by-one training up to float summation order: weights within about 1e-7
after a few epochs (``tests/test_batched.py`` holds them to 1e-5). Over many rounds, the
non-smooth operations (ReLU, max-pooling) can grow such differences, as a change of thread
count or hardware does. Only models whose samples are independent and that carry no training
state can be batched (:func:`unbatchable`): BatchNorm (batch statistics would mix real and
padded samples), dropout (random masks) and buffers of any kind are refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fedkd.scenario import TrainConfig
from fedkd.train import FitResult, batch_indices, device_of

#: One client's outcome: its trained state and what its training did, or why it diverged.
Outcome = tuple[dict[str, Tensor], FitResult] | FloatingPointError


def unbatchable(model: nn.Module) -> str | None:
    """Why ``model`` cannot be trained by :func:`train_batched` (None when it can).

    Parameters
    ----------
    model : nn.Module
        A model of the architecture to batch.

    Returns
    -------
    str or None
        A short reason: a BatchNorm layer, a dropout layer with ``p > 0``, or a buffer.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"BatchNorm layer {name!r}"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"dropout layer {name!r}"
    for name, _ in model.named_buffers():
        return f"buffer {name!r}"
    return None


def _schedule(sizes: Sequence[int], cfg: TrainConfig, seeds: Sequence[int],
              ) -> tuple[Tensor, Tensor]:
    """Every client's batches as padded tensors.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``index`` of shape ``(T, C, B)`` into the concatenated data (client ``c``'s sample
        ``i`` is ``offset_c + i``; padding points at sample 0) and ``weight`` of the same
        shape, 1.0 for a real sample and 0.0 for padding; ``T`` is the most steps of any
        client, ``B`` the batch size.
    """
    per_client = [list(batch_indices(n, cfg.batch_size, torch.Generator().manual_seed(seed),
                                     epochs=cfg.epochs, steps=cfg.steps))
                  for n, seed in zip(sizes, seeds, strict=True)]
    steps = max((len(b) for b in per_client), default=0)
    index = torch.zeros(steps, len(sizes), cfg.batch_size, dtype=torch.long)
    weight = torch.zeros(steps, len(sizes), cfg.batch_size)
    offset = 0
    for c, batches in enumerate(per_client):
        for t, idx in enumerate(batches):
            index[t, c, :len(idx)] = idx + offset
            weight[t, c, :len(idx)] = 1.0
        offset += sizes[c]
    return index, weight


#: Most clients in one vectorised call on the CPU (``group=0``): 100 stacked clients fall out
#: of the caches that one client's parameters and activations fit in (``cnn_small``, 100
#: clients: 22.4 s in one group, about 11 s in groups of 8 to 20, 7.6 s one by one).
CPU_GROUP = 16


def train_batched(model: nn.Module, states: Sequence[dict[str, Tensor]],
                  datas: Sequence[tuple[Tensor, Tensor]], cfg: TrainConfig,
                  seeds: Sequence[int], group: int = 0) -> list[Outcome]:
    """Train the clients of one architecture in vectorised groups, as
    :func:`~fedkd.train.train_supervised` trains each.

    Parameters
    ----------
    model : nn.Module
        A model of the clients' architecture, on the device to train on (its own weights are
        not used or changed); it must pass :func:`unbatchable`.
    states : Sequence[dict[str, Tensor]]
        Each client's starting state dict.
    datas : Sequence[tuple[Tensor, Tensor]]
        Each client's ``(x, y)``.
    cfg : TrainConfig
        Optimiser and schedule, shared by all the clients.
    seeds : Sequence[int]
        Each client's batch-order seed (as given to ``train_supervised``).
    group : int
        Most clients in one vectorised call; 0: all of them on a GPU, :data:`CPU_GROUP` on the
        CPU. Every client's result is the same in any grouping (up to float rounding).

    Returns
    -------
    list[Outcome]
        Per client, in order: ``(state dict on the CPU, FitResult)``, or the
        ``FloatingPointError`` one-by-one training would have raised.

    Raises
    ------
    ValueError
        When the model cannot be batched or the inputs' lengths differ.
    """
    if (reason := unbatchable(model)) is not None:
        raise ValueError(f"cannot train {type(model).__name__} batched: {reason}")
    if not len(states) == len(datas) == len(seeds):
        raise ValueError(f"{len(states)} states, {len(datas)} datasets, {len(seeds)} seeds")
    size = group or (len(states) if device_of(model).type == "cuda" else CPU_GROUP)
    out: list[Outcome] = []
    for i in range(0, len(states), size):
        out += _train_group(model, states[i:i + size], datas[i:i + size], cfg,
                            seeds[i:i + size])
    return out


def _train_group(model: nn.Module, states: Sequence[dict[str, Tensor]],
                 datas: Sequence[tuple[Tensor, Tensor]], cfg: TrainConfig,
                 seeds: Sequence[int]) -> list[Outcome]:
    """One vectorised call for a non-empty group of clients that :func:`train_batched` has
    checked; its arguments and result as there."""
    dev = device_of(model)
    names = [name for name, _ in model.named_parameters()]
    params = {k: torch.stack([s[k] for s in states]).to(dev) for k in names}
    sizes = [len(y) for _, y in datas]
    index, weight = _schedule(sizes, cfg, seeds)
    index, weight = index.to(dev), weight.to(dev)
    x_all = torch.cat([x for x, _ in datas]).to(dev)
    y_all = torch.cat([y for _, y in datas]).to(dev)
    model.train()

    def loss_fn(p: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        per_sample = F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        return (per_sample * w).sum() / w.sum().clamp(min=1.0)

    step_fn = vmap(grad_and_value(loss_fn))
    clients = len(states)
    buffers = {k: torch.zeros_like(v) for k, v in params.items()} if cfg.momentum else {}
    total = torch.zeros(clients, dtype=torch.float64, device=dev)
    diverged_at = torch.full((clients,), -1, dtype=torch.long, device=dev)
    diverged_loss = torch.zeros(clients, device=dev)
    for t in range(index.shape[0]):
        w = weight[t]
        count = w.sum(1)
        grads, loss = step_fn(params, x_all[index[t]], y_all[index[t]], w)
        active = (count > 0) & (diverged_at < 0)
        bad = active & ~torch.isfinite(loss)
        diverged_at = torch.where(bad, t, diverged_at)
        diverged_loss = torch.where(bad, loss, diverged_loss)
        active = active & ~bad
        total += torch.where(active, loss.double() * count.double(), 0.0)
        _sgd_step(params, grads, buffers, active, cfg)
    steps = (weight.sum(2) > 0).sum(0).tolist()
    examples = weight.sum((0, 2)).long().tolist()
    out: list[Outcome] = []
    for c, (at, bad_loss, tot) in enumerate(zip(diverged_at.tolist(), diverged_loss.tolist(),
                                                total.tolist(), strict=True)):
        if at >= 0:
            out.append(FloatingPointError(f"training diverged: loss {bad_loss} at step {at}"))
            continue
        state = {k: params[k][c].detach().cpu().clone() for k in names}
        out.append((state, FitResult(loss=tot / max(examples[c], 1), steps=steps[c],
                                     examples=examples[c])))
    return out


def _sgd_step(params: dict[str, Tensor], grads: dict[str, Tensor], buffers: dict[str, Tensor],
              active: Tensor, cfg: TrainConfig) -> None:
    """One ``torch.optim.SGD`` step on stacked tensors, in place, for the ``active`` clients.

    A client without a batch has a zero gradient (all its sample weights are 0), and every
    per-client factor below is 0 for it (1 for the momentum), so its parameters and buffer stay
    exactly put without a masked copy: ``d = g + (wd a) p``, ``buf = (m if a else 1) buf + d``,
    ``p = p + (-lr a) buf``, with ``a`` the client's 0/1 activity. (A client that diverged is
    inactive too; its tensors no longer matter.)
    """
    dtype = next(iter(params.values())).dtype
    a = active.to(dtype)
    neg_lr = a * -cfg.lr
    decay = a * cfg.weight_decay
    keep = torch.where(active, torch.tensor(cfg.momentum, dtype=dtype, device=a.device),
                       torch.tensor(1.0, dtype=dtype, device=a.device))
    for k, p in params.items():
        shape = (-1, *([1] * (p.dim() - 1)))
        d = grads[k]
        if cfg.weight_decay != 0:
            d = d.addcmul_(p, decay.view(shape))
        if cfg.momentum != 0:
            d = buffers[k].mul_(keep.view(shape)).add_(d)
        p.addcmul_(d, neg_lr.view(shape))
