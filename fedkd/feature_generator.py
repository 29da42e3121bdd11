"""FedGen's conditional generator of latent features and the losses that train and use it.

Zhu, Hong, Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021 (reference code: github.com/zhuangdizhu/FedGen, ``trainmodel/generator.py``,
``servers/serverpFedGen.py``, ``users/userpFedGen.py``). The strategy that trains the generator
on the server and sends it to the clients is ``strategies/fedgen.py``; this module holds the
pieces that do not depend on messages: the network, the stacked clients' heads it is trained
against, the server objective and the client regulariser.

Conventions (reference code, unless stated):

- Generator: ``[eps, one_hot(y)] -> Linear -> BatchNorm1d -> ReLU -> Linear(latent_dim)``,
  ``eps ~ U[0, 1)`` (the code's ``torch.rand``), hidden 256, noise 32 (MNIST config).
- Server objective (:func:`generator_loss`)::

      L_G = alpha * mean_n sum_k w[y_n, k] * CE(head_k(z_n), y_n)
          + eta   * diversity_loss(eps, z)
          - beta  * mean_s kd_kl(head_s(z), sum_k w[y_n, k] head_k(z_n))

  Teacher CE: per-sample CE weighted by ``w[y, k]``, summed over teachers, averaged over the
  batch (the code's ``sum_k mean(CE_k * w_k)``). Diversity:
  :func:`fedkd.distill.diversity_loss` (L1 between outputs, squared L2 between noises,
  ``exp(-mean(.))``). The adversarial term compares with :func:`fedkd.distill.kd_kl`
  (``batchmean``, ensemble side detached); the code uses ``reduction="mean"`` without
  detaching, and its default ``ensemble_beta = 0`` switches the term off.
- Client regulariser (:func:`client_regulariser`), added to ``CE(model(x), y)``::

      gen_ratio * alpha_t * CE(head(G(y_hat)), y_hat)
      + beta_t * KL(softmax(head(G(y))).detach() ‖ softmax(model(x)))

  ``KLDivLoss(reduction="batchmean")`` at ``T = 1`` (:func:`fedkd.distill.kd_kl_probs`), CE
  terms are batch means, ``gen_ratio = gen_batch_size / batch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn

from fedkd.comm import arrayrecord_to_state_dict
from fedkd.distill import diversity_loss, kd_kl, kd_kl_probs, weighted_logits


class Generator(nn.Module):
    """Conditional generator of latent features ``G(y, eps)``.

    Parameters
    ----------
    num_classes : int
        Number of labels (width of the one-hot condition).
    latent_dim : int
        Width of the generated features (the clients' ``head`` input).
    noise_dim : int
        Width of the noise ``eps``.
    hidden_dim : int
        Width of the hidden layer.
    """

    def __init__(self, num_classes: int, latent_dim: int, noise_dim: int = 32,
                 hidden_dim: int = 256) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.body = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim),
                                  nn.BatchNorm1d(hidden_dim), nn.ReLU())
        self.out = nn.Linear(hidden_dim, latent_dim)

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, noise_dim)`` noise drawn from ``U[0, 1)``."""
        return torch.rand(n, self.noise_dim, generator=generator)

    def forward(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Latent features ``(N, latent_dim)`` for labels ``y`` and noise ``eps``."""
        cond = F.one_hot(y, self.num_classes).to(eps.dtype)
        return self.out(self.body(torch.cat([eps, cond], dim=1)))


def build_generator(num_classes: int, latent_dim: int, noise_dim: int, hidden_dim: int,
                    seed: int = 0) -> Generator:
    """A generator with a seeded initialisation (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(num_classes, latent_dim, noise_dim, hidden_dim)


def load_generator(record: ArrayRecord, num_classes: int, latent_dim: int, noise_dim: int,
                   hidden_dim: int) -> Generator:
    """A generator of the given widths loaded with the arrays of ``record``."""
    gen = Generator(num_classes, latent_dim, noise_dim, hidden_dim)
    gen.load_state_dict(arrayrecord_to_state_dict(record))
    return gen


@dataclass(frozen=True)
class Heads:
    """K linear heads stacked: ``weight (K, C, D)``, ``bias (K, C)``."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def from_records(cls, records: Sequence[ArrayRecord]) -> Heads:
        """The ``head.weight``/``head.bias`` arrays of each client's model record."""
        sds = [arrayrecord_to_state_dict(r, prefix="head") for r in records]
        return cls(torch.stack([sd["weight"].float() for sd in sds]),
                   torch.stack([sd["bias"].float() for sd in sds]))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(K, N, C)`` logits of every head on features ``z`` (differentiable in ``z``)."""
        return torch.einsum("kcd,nd->knc", self.weight, z) + self.bias.unsqueeze(1)


def weighted_teacher_ce(teacher_logits: torch.Tensor, y: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """``mean_n sum_k w[n, k] * CE(logits[k, n], y[n])``.

    Parameters
    ----------
    teacher_logits : torch.Tensor
        ``(K, N, C)``.
    y : torch.Tensor
        ``(N,)`` labels.
    weights : torch.Tensor
        ``(N, K)`` per-sample teacher weights.
    """
    k, n, c = teacher_logits.shape
    ce = F.cross_entropy(teacher_logits.reshape(k * n, c), y.repeat(k),
                         reduction="none").view(k, n)
    return (ce * weights.T.to(ce.dtype)).sum(0).mean()


def generator_loss(z: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, teachers: Heads,
                   weights: torch.Tensor, students: Sequence[Heads] = (),
                   alpha: float = 1.0, beta: float = 0.0,
                   eta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """FedGen's server objective on one generated batch and its parts.

    ``alpha * weighted CE + eta * diversity - beta * mean_s kd_kl(student_s, ensemble)``;
    the adversarial term is only computed when ``beta > 0`` and students are given.
    """
    logits = teachers.logits(z)
    teacher = weighted_teacher_ce(logits, y, weights)
    div = diversity_loss(eps, z)
    loss = alpha * teacher + eta * div
    parts = {"teacher": float(teacher.detach()), "diversity": float(div.detach()),
             "student": 0.0}
    if beta > 0 and students:
        ensemble = weighted_logits(logits, weights)
        adv = torch.stack([kd_kl(s.logits(z)[0], ensemble) for s in students]).mean()
        loss = loss - beta * adv
        parts["student"] = float(adv.detach())
    return loss, parts


def client_regulariser(logits: torch.Tensor, head: nn.Module, z_real: torch.Tensor,
                       z_gen: torch.Tensor, y_gen: torch.Tensor, alpha: float, beta: float,
                       gen_ratio: float) -> torch.Tensor:
    """FedGen's client terms added to ``CE(model(x), y)``.

    ``gen_ratio * alpha * CE(head(z_gen), y_gen) + beta * KL(softmax(head(z_real)).detach()
    ‖ softmax(logits))`` (``batchmean``, ``T = 1``).

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` model logits on the real batch.
    head : nn.Module
        The model's linear head.
    z_real : torch.Tensor
        ``(N, D)`` generated features for the real batch's labels.
    z_gen, y_gen : torch.Tensor
        ``(M, D)`` generated features for the sampled labels ``y_gen``.
    alpha, beta : float
        This round's ``alpha_t`` and ``beta_t``.
    gen_ratio : float
        ``gen_batch_size / batch_size``.
    """
    target = F.softmax(head(z_real), dim=1)
    latent = beta * kd_kl_probs(logits, target)
    teacher = alpha * F.cross_entropy(head(z_gen), y_gen)
    return gen_ratio * teacher + latent
