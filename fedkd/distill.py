"""Knowledge-distillation losses and ensemble helpers, as small pure functions.

Conventions (each pinned by a unit test):

- :func:`kd_kl` is ``KL(teacher ‖ student)`` between temperature-softened distributions,
  ``reduction="batchmean"`` (the mathematically correct per-sample mean), multiplied by ``T²``
  so gradient magnitudes do not shrink with the temperature (Hinton et al. 2015). The teacher
  side is always detached. FedDF (Lin et al. 2020) and FedFTG/DENSE distil with it.
- :func:`mutual_kl` is DML's term ``KL(peer.detach() ‖ self)`` at ``T = 1`` by default
  (Zhang et al. CVPR 2018), averaged over peers.
- :func:`logit_mae` is FedMD's digest loss: mean absolute error between the student's logits
  and the consensus logits (Li & Wang 2019).
- :func:`diversity_loss` is FedGen's ``exp(-mean(d_noise * d_output))`` with L1 distance
  between outputs and squared L2 between noises (Zhu et al. ICML 2021, Mode-seeking GAN).
- Ensembles combine teachers with per-sample, per-teacher weights ``w[n, k]`` that sum to 1
  over ``k`` (see ``strategies/weighting.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
          temperature: float = 1.0, detach_teacher: bool = True) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, batch mean; teacher detached.

    Parameters
    ----------
    student_logits : torch.Tensor
        ``(N, C)`` logits of the model being trained.
    teacher_logits : torch.Tensor
        ``(N, C)`` target logits (no gradient flows into them).
    temperature : float
        Softening temperature ``T``.
    detach_teacher : bool
        Stop gradients into the teacher (the distillation convention). Generator training
        (DENSE) keeps them so the disagreement also flows back through the teachers.
    """
    t = temperature
    teacher = teacher_logits.detach() if detach_teacher else teacher_logits
    target = F.softmax(teacher / t, dim=1)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), target,
                    reduction="batchmean") * t * t


def kd_kl_probs(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """Like :func:`kd_kl` with the teacher given as probabilities (already at temperature T)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), teacher_probs.detach(),
                    reduction="batchmean") * t * t


def mutual_kl(logits: torch.Tensor, peer_logits: list[torch.Tensor],
              temperature: float = 1.0) -> torch.Tensor:
    """DML: mean over peers of ``KL(peer.detach() ‖ self)`` (zero when there is no peer)."""
    if not peer_logits:
        return logits.sum() * 0.0
    return torch.stack([kd_kl(logits, p, temperature) for p in peer_logits]).mean()


def logit_mae(student_logits: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
    """FedMD digest: mean absolute error between logits and the (detached) consensus."""
    return F.l1_loss(student_logits, consensus.detach())


def diversity_loss(noise: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """FedGen's diversity loss ``exp(-mean(d2(noise) * d1(output)))`` over all sample pairs.

    ``d2`` is the mean squared difference between noise vectors, ``d1`` the mean absolute
    difference between (flattened) outputs; a generator that maps different noise to the
    same output is penalised.
    """
    out = output.reshape(len(output), -1)
    d_out = (out.unsqueeze(1) - out.unsqueeze(0)).abs().mean(dim=2)
    d_noise = (noise.unsqueeze(1) - noise.unsqueeze(0)).pow(2).mean(dim=2)
    return torch.exp(-(d_noise * d_out).mean())


def weighted_logits(teacher_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Ensemble logits ``sum_k w[n, k] * logits[k, n, :]``.

    Parameters
    ----------
    teacher_logits : torch.Tensor
        ``(K, N, C)`` logits of K teachers on N samples.
    weights : torch.Tensor
        ``(N, K)`` per-sample weights (rows sum to 1) or ``(K,)`` per-teacher weights.
    """
    if weights.dim() == 1:
        weights = weights.unsqueeze(0).expand(teacher_logits.shape[1], -1)
    return torch.einsum("nk,knc->nc", weights.to(teacher_logits.dtype), teacher_logits)


def weighted_probs(teacher_logits: torch.Tensor, weights: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """Ensemble probabilities ``sum_k w[n, k] * softmax(logits[k, n] / T)``."""
    return weighted_logits(F.softmax(teacher_logits / temperature, dim=2), weights)


def not_true_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(N, C - 1)``: each row's logits without its true class's column, order kept."""
    n, c = logits.shape
    keep = torch.ones(n, c, dtype=torch.bool, device=logits.device)
    keep[torch.arange(n, device=logits.device), targets] = False
    return logits[keep].view(n, c - 1)


def not_true_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """FedNTD's not-true distillation: ``KL(softmax(t̃/T) ‖ softmax(s̃/T))``, batch mean, where
    ``s̃``, ``t̃`` drop each sample's true class; teacher detached, no ``T²`` factor (as the
    reference's ``NTD_Loss``)."""
    teacher = not_true_logits(teacher_logits.detach(), targets)
    student = not_true_logits(student_logits, targets)
    return F.kl_div(F.log_softmax(student / temperature, dim=1),
                    F.softmax(teacher / temperature, dim=1), reduction="batchmean")


def era(probs: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """DS-FL's entropy reduction aggregation: ``softmax(probs / T)`` over the classes.

    Itahara et al. (IEEE TMC 2021) sharpen the clients' *averaged probabilities* (not logits)
    with a softmax at a low temperature ``T`` (0.1 in the paper), so the global soft labels
    are less ambiguous than their plain mean. Probabilities lie in [0, 1], so how much a row
    sharpens depends on how peaked it already is: near the uniform distribution over ``C``
    classes only ``T < 1/C`` sharpens; ``T = 1`` does not give back the mean (it flattens it).

    Parameters
    ----------
    probs : torch.Tensor
        ``(..., C)`` probability rows, e.g. the (weighted) mean of the clients' softmax outputs.
    temperature : float
        ``T > 0``.
    """
    return F.softmax(probs / temperature, dim=-1)
