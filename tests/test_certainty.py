"""FedAUX's certainty weighting: the scorer, its DP noise and the weights, pinned exactly."""

from __future__ import annotations

import math

import pytest
import torch

from fedkd.errors import ScenarioError
from strategies.certainty import (
    Certainty,
    CertaintyParams,
    certainty_scores,
    certainty_weights,
    dp_sigma,
    fit_feature_map,
    fit_scorer,
    objective,
)
from strategies.weighting import TeacherContext, make_weighting, uses_labels


def blobs(n: int, m: int, d: int = 5, gap: float = 3.0, seed: int = 0,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Own samples around ``+gap e_1``, public ones around ``-gap e_1`` (unit variance)."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.zeros(d)
    shift[0] = gap
    own = torch.randn(n, d, generator=gen) + shift
    public = torch.randn(m, d, generator=gen) - shift
    return own, public


def ctx_with(certainty: torch.Tensor | None) -> TeacherContext:
    k = 3 if certainty is None else certainty.shape[0]
    return TeacherContext(num_examples=torch.ones(k), label_counts=torch.ones(k, 2),
                          certainty=certainty)


def logits_for(k: int, n: int) -> torch.Tensor:
    return torch.zeros(k, n, 2, dtype=torch.float64)


# ---------------------------------------------------------------------------------- scorer
def test_scorer_separates_two_blobs() -> None:
    own, public = blobs(200, 300, gap=6.0)
    scorer = fit_scorer(own, public, l2=0.01, steps=100, lr=1.0, seed=0, dp_epsilon=None,
                        dp_delta=1e-5)
    test_own, test_public = blobs(100, 100, gap=6.0, seed=1)
    assert bool((scorer.scores(test_own) > 0.9).all())
    assert bool((scorer.scores(test_public) < 0.1).all())


def test_certainty_scores_end_to_end_on_image_shaped_inputs() -> None:
    own, public = blobs(150, 250, d=16, gap=6.0)
    own, public = own.reshape(-1, 1, 4, 4), public.reshape(-1, 1, 4, 4)
    proxy = torch.cat([own[:10], public[:10]])
    params = CertaintyParams(l2=1e-3, dim=8)
    s = certainty_scores(own, public, proxy, params, seed=3)
    assert s.shape == (20,) and s.dtype == torch.float32
    assert bool((s[:10] > 0.9).all()) and bool((s[10:] < 0.1).all())
    assert torch.equal(s, certainty_scores(own, public, proxy, params, seed=3))


def test_scorer_minimises_the_documented_objective_exactly() -> None:
    """One own feature 0.5, one public -0.5, λ = 0.1. By symmetry the bias is 0 and the weight
    t solves ``λ t = sigmoid(-t / (2√2)) / √2``; the pinned root came from::

        f = lambda t: 0.1 * t - 1 / (1 + math.exp(t / (2 * math.sqrt(2)))) / math.sqrt(2)
        lo, hi = 0.0, 100.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    """
    scorer = fit_scorer(torch.tensor([[0.5]]), torch.tensor([[-0.5]]), l2=0.1)
    assert scorer.weight.item() == pytest.approx(2.216836024527926, abs=1e-8)
    assert scorer.bias == pytest.approx(0.0, abs=1e-10)
    t = 2.216836024527926
    assert scorer.scores(torch.tensor([[0.5]])).item() == pytest.approx(
        1 / (1 + math.exp(-t * 0.5 / math.sqrt(2))), abs=1e-8)


def test_scorer_is_at_a_stationary_point_of_the_objective() -> None:
    own, public = blobs(40, 60, gap=0.5)
    scorer = fit_scorer(own, public, l2=0.05)
    theta = scorer.theta.clone().requires_grad_(True)
    objective(theta, own.double(), public.double(), 0.05).backward()
    assert theta.grad is not None and float(theta.grad.norm()) < 1e-8


def test_scorer_is_class_balanced_so_repeating_own_data_changes_nothing() -> None:
    own, public = blobs(30, 90, gap=0.5)
    once = fit_scorer(own, public, l2=0.05)
    thrice = fit_scorer(own.repeat(3, 1), public, l2=0.05)
    assert torch.allclose(once.theta, thrice.theta, atol=1e-8)


def test_scorer_is_deterministic_for_a_seed() -> None:
    own, public = blobs(50, 50)
    a = fit_scorer(own, public, seed=7, dp_epsilon=0.5)
    b = fit_scorer(own, public, seed=7, dp_epsilon=0.5)
    c = fit_scorer(own, public, seed=8, dp_epsilon=0.5)
    assert torch.equal(a.theta, b.theta)
    assert not torch.equal(a.theta, c.theta)


# ---------------------------------------------------------------------------------- DP
def test_dp_sigma_pinned() -> None:
    # (2 / (100 * 0.1)) * sqrt(2 ln(1.25e5)) / 0.5 = 0.4 * sqrt(2 ln 125000)
    assert dp_sigma(100, 0.1, 0.5, 1e-5) == pytest.approx(1.9379221050421558, rel=1e-14)
    assert dp_sigma(100, 0.1, 0.5, 1e-5) == pytest.approx(
        math.sqrt(8 * math.log(1.25 / 1e-5)) / (100 * 0.1 * 0.5), rel=1e-14)


def test_dp_noise_is_exactly_the_seeded_gaussian_draw() -> None:
    own, public = blobs(100, 80)
    plain = fit_scorer(own, public, l2=0.1, seed=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    noisy = fit_scorer(own, public, l2=0.1, seed=5, dp_epsilon=0.5, dp_delta=1e-5)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    draw = torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = 1.9379221050421558 * draw  # n = 100 own samples, λ = 0.1, ε = 0.5, δ = 1e-5
    assert torch.allclose(noisy.weight - plain.weight, expected[:5], rtol=0, atol=1e-12)
    assert noisy.bias - plain.bias == pytest.approx(float(expected[5]), abs=1e-12)


def test_dp_noise_scales_with_own_samples_only() -> None:
    own, public = blobs(100, 80)
    _, more_public = blobs(100, 400)
    a = fit_scorer(own, public, l2=0.1, seed=2, dp_epsilon=0.5)
    b = fit_scorer(own, public, l2=0.1, seed=2)
    c = fit_scorer(own, more_public, l2=0.1, seed=2, dp_epsilon=0.5)
    d = fit_scorer(own, more_public, l2=0.1, seed=2)
    assert torch.allclose(a.theta - b.theta, c.theta - d.theta, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- features
def test_feature_map_is_public_only_shared_and_bounded() -> None:
    own, public = blobs(30, 40, d=12)
    fmap = fit_feature_map(public, dim=4, seed=0)
    again = fit_feature_map(public, dim=4, seed=0)
    assert torch.equal(fmap.projection, again.projection) and fmap.scale == again.scale
    phi_public = fmap(public)
    assert phi_public.shape == (40, 4) and phi_public.dtype == torch.float64
    assert float(phi_public.norm(dim=1).max()) == pytest.approx(1.0, abs=1e-12)
    assert float(fmap(own * 100).norm(dim=1).max()) <= 1.0 + 1e-12  # clipped
    flat = fit_feature_map(public, dim=None)
    assert flat(public).shape == (40, 12)


def test_constant_public_feature_keeps_unit_std() -> None:
    public = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    fmap = fit_feature_map(public, dim=None)
    assert torch.equal(fmap.std, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(fmap(public), torch.tensor([[-1.0, 0.0], [1.0, 0.0]],
                                                     dtype=torch.float64))


# ---------------------------------------------------------------------------------- weighting
def test_weighting_exact_rows() -> None:
    scores = torch.tensor([
        [0.6, 0.5, 0.0, 0.9],   # teacher 0
        [0.2, 0.5, 0.0, 0.3],   # teacher 1
        [0.0, 0.5, 0.0, 0.0],   # teacher 2: zero on samples 0, 2, 3
    ])
    w = make_weighting("certainty")(logits_for(3, 4), ctx_with(scores))
    third = 1 / 3
    expected = torch.tensor([[0.75, 0.25, 0.0],         # 0.6 / 0.8, 0.2 / 0.8
                             [third, third, third],     # identical scores -> uniform
                             [third, third, third],     # all zero -> uniform
                             [0.75, 0.25, 0.0]],        # 0.9 / 1.2, 0.3 / 1.2
                            dtype=torch.float64)
    assert w.shape == (4, 3) and w.dtype == torch.float64
    assert torch.allclose(w, expected, rtol=0, atol=1e-7)  # scores were float32
    assert torch.equal(w[:, 2][[0, 3]], torch.zeros(2, dtype=torch.float64))


def test_teacher_with_all_zero_scores_gets_zero_weight() -> None:
    scores = torch.tensor([[0.2, 0.8], [0.6, 0.2], [0.0, 0.0]], dtype=torch.float64)
    w = certainty_weights(scores)
    assert torch.equal(w[:, 2], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([[0.25, 0.75, 0.0], [0.8, 0.2, 0.0]],
                                          dtype=torch.float64), rtol=0, atol=1e-15)


def test_rows_sum_to_one_and_follow_logits_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 7, generator=gen)
    scores[:, 3] = 0.0
    w = Certainty()(torch.zeros(5, 7, 3), ctx_with(scores))
    assert w.dtype == torch.float32
    assert torch.allclose(w.sum(dim=1), torch.ones(7))
    assert torch.allclose(w[3], torch.full((5,), 0.2))


def test_missing_or_malformed_scores_raise() -> None:
    with pytest.raises(ValueError, match="needs the clients' certainty scores"):
        Certainty()(logits_for(3, 2), ctx_with(None))
    with pytest.raises(ValueError, match=r"must be \(K, N\)"):
        Certainty()(logits_for(3, 2), ctx_with(torch.ones(3, 4)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        Certainty()(logits_for(2, 1), ctx_with(torch.tensor([[-0.1], [0.5]])))
    with pytest.raises(ValueError, match="finite and >= 0"):
        certainty_weights(torch.tensor([[float("nan")], [0.5]]))


def test_select_keeps_certainty_per_teacher() -> None:
    scores = torch.tensor([[0.6, 0.1], [0.2, 0.3], [0.9, 0.9]])
    ctx = ctx_with(scores).select(torch.tensor([True, False, True]))
    w = Certainty()(logits_for(2, 2), ctx)
    assert torch.allclose(w, torch.tensor([[0.4, 0.6], [0.1, 0.9]], dtype=torch.float64))


# ---------------------------------------------------------------------------------- params
@pytest.mark.parametrize(("field", "value"), [
    ("l2", 0.0), ("l2", -1.0), ("steps", 0), ("steps", 1.5), ("lr", 0.0), ("dim", 0),
    ("dp_epsilon", 0.0), ("dp_epsilon", 1.0), ("dp_epsilon", 2.0), ("dp_delta", 0.0),
    ("dp_delta", 1.0), ("feature_seed", 0.5), ("l2", float("nan")), ("steps", True),
])
def test_bad_params_raise_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        CertaintyParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        Certainty(**{field: value})


def test_fit_scorer_validates_its_arguments() -> None:
    own, public = blobs(5, 5)
    with pytest.raises(ValueError, match="^l2 must be"):
        fit_scorer(own, public, l2=0.0)
    with pytest.raises(ValueError, match=r"\(n, d\) and \(m, d\)"):
        fit_scorer(own, public[:, :3])
    with pytest.raises(ValueError, match="at least one own"):
        fit_scorer(own[:0], public)


def test_make_weighting_builds_it_from_the_registry() -> None:
    w = make_weighting("certainty", {"l2": 1, "steps": 20, "dim": None, "dp_epsilon": 0.5,
                                     "dp_delta": 1e-6})
    assert isinstance(w, Certainty)
    assert w.params == CertaintyParams(l2=1.0, steps=20, dim=None, dp_epsilon=0.5,
                                       dp_delta=1e-6)
    assert Certainty.client_scores is True and not uses_labels(w)
    with pytest.raises(ScenarioError, match="weighting_params"):
        make_weighting("certainty", {"l2": -1.0})
    with pytest.raises(ScenarioError, match="weighting_params.temperature"):
        make_weighting("certainty", {"temperature": 1.0})
