"""Data-free synthesis pieces pinned on toy tensors: bounded generator, BN prior, adversary."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedkd.errors import ScenarioError
from fedkd.synthesis import (
    BatchNormPrior,
    Generator,
    SynthesisWeights,
    adversarial_loss,
    reset_generator,
    synthesis_loss,
    value_range,
)

LOW, HIGH = torch.tensor([-0.8]), torch.tensor([2.8])


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 7, 9)])
def test_generator_output_shape_and_bounds(shape: tuple[int, int, int]) -> None:
    c = shape[0]
    low, high = torch.full((c,), -1.0) - torch.arange(c), torch.full((c,), 2.0)
    gen = Generator(16, shape, low, high, num_classes=10, width=8)
    # whatever the weights, the images stay inside the data's value range
    with torch.no_grad():
        for p in gen.parameters():
            p.mul_(50.0)
    x = gen(torch.randn(5, 16) * 10, torch.arange(5)).detach()
    assert x.shape == (5, *shape)
    for ch in range(c):
        assert float(x[:, ch].min()) >= float(low[ch]) and float(x[:, ch].max()) <= 2.0


def test_conditional_generator_depends_on_label_and_unconditional_needs_none() -> None:
    gen = Generator(8, (1, 8, 8), LOW, HIGH, num_classes=3, width=4).eval()
    z = torch.randn(1, 8).repeat(4, 1)
    x = gen(z, torch.tensor([0, 1, 0, 2]))
    torch.testing.assert_close(x[0], x[2])
    assert not torch.allclose(x[0], x[1])
    with pytest.raises(ValueError, match="labels"):
        gen(z)
    free = Generator(8, (1, 8, 8), LOW, HIGH, width=4)
    assert free.embed is None and free(z).shape == (4, 1, 8, 8)


def test_reset_generator_is_dense_init_and_seeded() -> None:
    gen = Generator(8, (1, 8, 8), LOW, HIGH, width=4)
    reset_generator(gen, seed=5)
    first = {k: v.clone() for k, v in gen.state_dict().items()}
    assert float(gen.fc.bias.detach().abs().sum()) == 0.0
    assert float(gen.fc.weight.detach().std()) == pytest.approx(0.02, rel=0.1)
    bn = gen.body[0]
    assert float(bn.weight.detach().mean()) == pytest.approx(1.0, abs=0.01)
    assert float(bn.bias.detach().sum()) == 0
    with torch.no_grad():
        gen.fc.weight.add_(1.0)
    reset_generator(gen, seed=5)
    for k, v in gen.state_dict().items():
        torch.testing.assert_close(v, first[k])


def test_value_range_per_channel() -> None:
    x = torch.tensor([[[[0.0, 1.0]], [[5.0, -2.0]]], [[[3.0, -1.0]], [[4.0, 4.0]]]])
    low, high = value_range(x)
    assert low.tolist() == [-1.0, -2.0] and high.tolist() == [3.0, 5.0]
    with pytest.raises(ScenarioError, match="data.input_shape"):
        value_range(torch.zeros(4, 3))


def test_batchnorm_prior_by_hand() -> None:
    """Running stats mean (0, 0), var (1, 1); the batch has channel means (2, 0) and biased
    variances (1, 0): ‖(1, 1) − (1, 0)‖ + ‖(0, 0) − (2, 0)‖ = 1 + 2 = 3."""
    bn = nn.BatchNorm2d(2).eval()
    x = torch.tensor([[[[1.0]], [[0.0]]], [[[3.0]], [[0.0]]]])
    with BatchNormPrior([bn]) as prior:
        bn(x)
    assert float(prior.loss) == pytest.approx(3.0)
    # two teachers: the terms add up; outside the context nothing is recorded any more
    other = nn.Sequential(nn.BatchNorm2d(2)).eval()
    with BatchNormPrior([bn, other]) as both:
        bn(x)
        other(x)
    assert float(both.loss) == pytest.approx(6.0)
    other(x * 10)
    assert float(both.loss) == pytest.approx(6.0)
    assert float(BatchNormPrior([nn.Linear(2, 2)]).loss) == 0.0


def test_batchnorm_prior_gradient_reaches_the_input() -> None:
    bn = nn.BatchNorm2d(1).eval()
    x = torch.randn(4, 1, 2, 2, requires_grad=True)
    with BatchNormPrior([bn]) as prior:
        bn(x)
    prior.loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_adversarial_loss_masks_by_hand() -> None:
    """Sample 0: student and ensemble agree (argmax 0); sample 1: they disagree."""
    ln3 = math.log(3.0)
    teacher = torch.tensor([[ln3, 0.0], [ln3, 0.0]])  # p = (3/4, 1/4)
    student = torch.tensor([[0.0, 0.0], [0.0, ln3]])  # q = (1/2, 1/2), (1/4, 3/4)
    kl0 = _kl([0.75, 0.25], [0.5, 0.5])
    kl1 = _kl([0.75, 0.25], [0.25, 0.75])
    assert float(adversarial_loss(student, teacher, "none")) == pytest.approx(-(kl0 + kl1) / 2)
    assert float(adversarial_loss(student, teacher, "disagree")) == pytest.approx(-kl1 / 2)
    assert float(adversarial_loss(student, teacher, "agree")) == pytest.approx(-kl0 / 2)
    assert float(adversarial_loss(student, teacher, "none", clip=0.1)) == pytest.approx(
        -(min(kl0, 0.1) + 0.1) / 2)
    # gradients reach both sides, as in the reference
    s, t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    adversarial_loss(s, t, "none").backward()
    assert s.grad is not None and t.grad is not None and float(t.grad.abs().sum()) > 0


def test_synthesis_loss_combines_terms() -> None:
    ens = torch.zeros(2, 2)  # CE = ln 2
    y = torch.tensor([0, 1])
    ln3 = math.log(3.0)
    student = torch.tensor([[ln3, 0.0], [0.0, ln3]])  # agrees with nobody: argmax of 0 is 0
    z = torch.tensor([[0.0], [1.0]])
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    w = SynthesisWeights(ce=2.0, bn=0.5, adv=3.0, div=4.0, adv_mask="none")
    out = synthesis_loss(ens, y, [student], torch.tensor(1.5), z, x, w)
    kl = _kl([0.5, 0.5], [0.75, 0.25])
    div = math.exp(-1.0)
    assert (out.ce, out.bn, out.div) == pytest.approx((math.log(2.0), 1.5, div))
    assert out.adv == pytest.approx(-kl)
    assert float(out.total) == pytest.approx(2 * math.log(2) + 0.75 - 3 * kl + 4 * div)


@pytest.mark.parametrize(("field", "value", "key"), [
    ("bn", -1.0, "strategy.params.lambda_bn"), ("adv_mask", "sometimes", "adv_mask"),
    ("adv_clip", 0.0, "strategy.params.adv_clip")])
def test_weights_name_the_key(field: str, value: object, key: str) -> None:
    with pytest.raises(ScenarioError, match=key):
        SynthesisWeights(**{field: value})  # type: ignore[arg-type]
