"""Data-free synthesis of inputs from a teacher ensemble: the generator and its losses.

The pieces DENSE and FedFTG build their server-side synthesis from:

- Zhang, Chen, Li, Lyu, Wu, Ding, Shen, Wu, "DENSE: Data-Free One-Shot Federated Learning",
  NeurIPS 2022 (reference code zj-jayzhang/DENSE: ``models/generator.py``,
  ``helpers/synthesizers.py``, ``helpers/utils.py``);
- Zhang, Shen, Ding, Tao, Duan, "Fine-tuning Global Model via Data-Free Knowledge
  Distillation for Non-IID Federated Learning", CVPR 2022 (FedFTG);
- Yin et al., "Dreaming to Distill: Data-Free Knowledge Transfer via DeepInversion",
  CVPR 2020 (the BatchNorm-statistics prior).

Conventions (pinned in ``tests/test_synthesis.py``):

- :class:`Generator` ends in a sigmoid mapped affinely onto the data's value range per
  channel, ``low + (high − low) · σ(h)``: DENSE's generator ends in ``Sigmoid`` because its
  data are in ``[0, 1]``; fedkd's data are normalised, so ``[0, 1]`` maps to
  ``[(0 − mean)/std, (1 − mean)/std]``. Its output is bounded whatever the generator learns.
- :func:`reset_generator`: DENSE's ``reset_model`` (conv/linear weights ``N(0, 0.02)``, biases
  0, BatchNorm weights ``N(1, 0.02)``, biases 0).
- :class:`BatchNormPrior`: DeepInversion's forward hooks as DENSE's ``DeepInversionHook``: per
  BatchNorm layer ``‖running_var − var‖₂ + ‖running_mean − mean‖₂`` of its *input* batch
  (biased variance), summed over every layer of every teacher.
- :func:`adversarial_loss`: DENSE's ``loss_adv = −mean_n(mask_n · KL(t_n ‖ s_n))`` with
  ``KL`` at ``T = 1`` summed over classes; ``mask = "disagree"`` keeps only samples whose
  argmax differs between student and ensemble (DENSE's code), ``"agree"`` only those where
  they agree (the data-free KD convention of Fang et al.'s CMI/Fast code: a sample stops
  being pushed once it became hard, which bounds the term), ``"none"`` every sample. An
  optional ``clip`` caps each sample's KL (a bound fedkd adds; off unless set). Gradients
  flow through both logits, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.distill import diversity_loss
from fedkd.errors import ScenarioError

ADV_MASKS = ("disagree", "agree", "none")


def value_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(low, high)`` of images ``(N, C, H, W)``: the range a generator maps to.

    For fedkd's normalised images these are ``(0 − mean)/std`` and ``(1 − mean)/std`` (the
    dataset's published normalisation constants); they are read off a split's extremes.
    """
    if x.dim() != 4:
        raise ScenarioError("data.input_shape", tuple(x.shape[1:]), "an image shape (C, H, W)")
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


class Generator(nn.Module):
    """DCGAN-like generator of images, unconditional (DENSE) or conditional (FedFTG).

    ``[z, embed(y)] -> linear -> (2w, ⌈H/4⌉, ⌈W/4⌉) -> BN -> up×2 -> conv-BN-LReLU -> up×2 ->
    conv-BN-LReLU -> conv -> crop to (H, W) -> low + (high − low) · sigmoid``.

    Parameters
    ----------
    noise_dim : int
        Width of ``z`` (and of the label embedding).
    input_shape : Sequence[int]
        ``(C, H, W)`` of the data.
    low, high : torch.Tensor
        ``(C,)`` per-channel value range of the data (:func:`value_range`).
    num_classes : int
        0 for an unconditional generator ``G(z)``; else ``G(z, y)`` embeds the label.
    width : int
        Base number of channels (DENSE's ``ngf``).
    """

    def __init__(self, noise_dim: int, input_shape: Sequence[int], low: torch.Tensor,
                 high: torch.Tensor, num_classes: int = 0, width: int = 64) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ScenarioError("data.input_shape", tuple(input_shape), "an image shape (C, H, W)")
        c, h, w = (int(s) for s in input_shape)
        self.out_hw = (h, w)
        self.init_hw = (math.ceil(h / 4), math.ceil(w / 4))
        self.embed = nn.Embedding(num_classes, noise_dim) if num_classes else None
        in_dim = 2 * noise_dim if num_classes else noise_dim
        self.fc = nn.Linear(in_dim, 2 * width * self.init_hw[0] * self.init_hw[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, c, 3, padding=1),
        )
        self.register_buffer("low", low.detach().float().reshape(1, c, 1, 1).clone())
        self.register_buffer("span", (high - low).detach().float().reshape(1, c, 1, 1).clone())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``(N, C, H, W)`` inside ``[low, high]`` for noise ``z`` (and labels ``y``)."""
        if self.embed is not None:
            if y is None:
                raise ValueError("a conditional generator needs labels")
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.fc(z).view(len(z), -1, *self.init_hw)
        x = self.body(h)[:, :, : self.out_hw[0], : self.out_hw[1]]
        return self.low + self.span * torch.sigmoid(x)


def reset_generator(generator: nn.Module, seed: int) -> None:
    """Re-initialise ``generator`` in place as DENSE does before each synthesis, seeded."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d | nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=rng) * 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + torch.randn(m.weight.shape, generator=rng) * 0.02)
                m.bias.zero_()
                m.reset_running_stats()


class BatchNormPrior:
    """DeepInversion's BatchNorm-statistics loss over every BatchNorm layer of ``modules``.

    Use as a context manager around forward passes; :attr:`loss` is the sum over layers of
    ``‖running_var − var‖₂ + ‖running_mean − mean‖₂`` for the last batch each layer saw.
    Modules without BatchNorm contribute nothing (the loss is then 0).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.layers = [m for module in modules for m in module.modules()
                       if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
        self.terms: dict[int, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> BatchNormPrior:
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...],
              output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims)
        var = x.transpose(0, 1).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        self.terms[id(module)] = (torch.linalg.vector_norm(module.running_var - var)
                                  + torch.linalg.vector_norm(module.running_mean - mean))

    @property
    def loss(self) -> torch.Tensor:
        """The summed statistics loss of the last forward pass (0 with no BatchNorm)."""
        if not self.terms:
            return torch.zeros(())
        return torch.stack(list(self.terms.values())).sum()


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     mask: str = "disagree", clip: float | None = None) -> torch.Tensor:
    """``−mean_n(mask_n · min(KL(t_n ‖ s_n), clip))`` at ``T = 1`` (DENSE's ``loss_adv``).

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor
        ``(N, C)`` logits of the student and of the ensemble on generated inputs.
    mask : str
        ``"disagree"``, ``"agree"`` (argmax of student vs ensemble) or ``"none"``.
    clip : float, optional
        Cap of each sample's KL.
    """
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1),
                  reduction="none").sum(dim=1)
    if clip is not None:
        kl = kl.clamp(max=clip)
    if mask != "none":
        same = student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)
        kl = kl * (same if mask == "agree" else ~same).to(kl.dtype)
    return -kl.mean()


@dataclass(frozen=True)
class SynthesisWeights:
    """Coefficients of the generator objective (DENSE's ``--oh``, ``--bn``, ``--adv``)."""

    ce: float = 1.0
    bn: float = 1.0
    adv: float = 1.0
    div: float = 0.0
    adv_mask: str = "disagree"
    adv_clip: float | None = None

    def __post_init__(self) -> None:
        for name in ("ce", "bn", "adv", "div"):
            if getattr(self, name) < 0:
                raise ScenarioError(f"strategy.params.lambda_{name}", getattr(self, name),
                                    "a number >= 0")
        if self.adv_mask not in ADV_MASKS:
            raise ScenarioError("strategy.params.adv_mask", self.adv_mask,
                                f"one of {list(ADV_MASKS)}")
        if self.adv_clip is not None and self.adv_clip <= 0:
            raise ScenarioError("strategy.params.adv_clip", self.adv_clip, "a number > 0")


@dataclass(frozen=True)
class SynthesisLoss:
    """The generator objective and its terms (floats, for logging)."""

    total: torch.Tensor
    ce: float
    bn: float
    adv: float
    div: float


def synthesis_loss(ens_logits: torch.Tensor, y: torch.Tensor,
                   student_logits: Sequence[torch.Tensor], bn_loss: torch.Tensor,
                   z: torch.Tensor, x: torch.Tensor, w: SynthesisWeights) -> SynthesisLoss:
    """``ce·CE(ens, y) + bn·L_bn + adv·mean_g L_adv(student_g, ens) + div·L_div(z, x)``.

    Parameters
    ----------
    ens_logits : torch.Tensor
        ``(N, C)`` weighted ensemble logits on ``x`` (with gradient into ``x``).
    y : torch.Tensor
        ``(N,)`` the labels ``x`` is generated for.
    student_logits : Sequence[torch.Tensor]
        ``(N, C)`` logits of each group's student on ``x``.
    bn_loss : torch.Tensor
        The teachers' BatchNorm-statistics loss on ``x`` (:class:`BatchNormPrior`).
    z, x : torch.Tensor
        Generator noise and output (for the diversity term).
    w : SynthesisWeights
        Coefficients, mask and clip.
    """
    ce = F.cross_entropy(ens_logits, y)
    adv = torch.stack([adversarial_loss(s, ens_logits, w.adv_mask, w.adv_clip)
                       for s in student_logits]).mean()
    div = diversity_loss(z, x) if w.div > 0 else torch.zeros(())
    total = w.ce * ce + w.bn * bn_loss + w.adv * adv + w.div * div
    return SynthesisLoss(total, float(ce.detach()), float(bn_loss.detach()),
                         float(adv.detach()), float(div.detach()))
