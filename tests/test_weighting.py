"""Each teacher weighting pinned on toy logits with exact numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fedkd.data.base import TensorSplit
from fedkd.data.bundle import DataBundle
from fedkd.errors import ScenarioError
from strategies.weighting import (
    WEIGHTINGS,
    TeacherContext,
    class_weights,
    make_weighting,
    uses_labels,
    weight_rows,
    weighting_split,
)

# 3 teachers, 2 samples, 3 classes
LOGITS = torch.tensor([
    [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]],   # teacher 0: confident on sample 0, flat on sample 1
    [[0.0, 0.0, 0.0], [0.0, 3.0, 0.0]],   # teacher 1: flat, then confident
    [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]],   # teacher 2: in between
], dtype=torch.float64)
CTX = TeacherContext(num_examples=torch.tensor([10, 30, 60]),
                     label_counts=torch.tensor([[10, 0, 0], [10, 20, 0], [20, 20, 20]]))


def rows_sum_to_one(w: torch.Tensor) -> None:
    assert torch.allclose(w.sum(dim=1), torch.ones(w.shape[0], dtype=w.dtype))


def test_uniform() -> None:
    w = make_weighting("uniform")(LOGITS, CTX)
    assert w.shape == (2, 3)
    assert torch.equal(w, torch.full((2, 3), 1 / 3, dtype=torch.float64))


def test_data_size() -> None:
    w = make_weighting("data_size")(LOGITS, CTX)
    assert torch.allclose(w, torch.tensor([[0.1, 0.3, 0.6]] * 2, dtype=torch.float64))


def test_class_weights_with_a_class_nobody_has() -> None:
    counts = torch.tensor([[3, 0, 0], [1, 2, 0]])
    w = class_weights(counts)
    assert torch.allclose(w, torch.tensor([[0.75, 0.25], [0.0, 1.0], [0.5, 0.5]],
                                          dtype=torch.float64))


def test_class_counts_given_and_predicted_labels() -> None:
    wc = make_weighting("class_counts")
    w = wc(LOGITS, CTX, labels=torch.tensor([0, 1]))
    assert torch.allclose(w, torch.tensor([[0.25, 0.25, 0.5], [0.0, 0.5, 0.5]],
                                          dtype=torch.float64))
    # without labels: the uniform ensemble predicts class 0 for sample 0, class 1 for sample 1
    assert torch.allclose(wc(LOGITS, CTX), w)


def test_confidence_exact() -> None:
    w = make_weighting("confidence", {"temperature": 1.0})(LOGITS, CTX)
    p = torch.softmax(LOGITS, dim=2).amax(dim=2)  # (K, N) max probabilities
    expected = torch.softmax(p.T, dim=1)
    assert torch.allclose(w, expected)
    e2 = math.exp(2)
    assert p[0, 0].item() == pytest.approx(e2 / (e2 + 2))
    assert w[0].argmax().item() == 0 and w[1].argmax().item() == 1
    rows_sum_to_one(w)


def test_entropy_prefers_sharp_teacher_and_all_equal_is_uniform() -> None:
    w = make_weighting("entropy", {"temperature": 0.5})(LOGITS, CTX)
    flat = math.log(3)  # entropy of a flat teacher
    assert w[0].argmin().item() == 1 and w[1].argmin().item() == 0
    logp = torch.log_softmax(LOGITS, dim=2)
    h = -(logp.exp() * logp).sum(dim=2)
    assert h[1, 0].item() == pytest.approx(flat)
    assert torch.allclose(w, torch.softmax(-h.T / 0.5, dim=1))
    same = LOGITS[:1].expand(3, -1, -1)
    for name in ("entropy", "confidence", "agreement"):
        assert torch.allclose(make_weighting(name)(same, CTX),
                              torch.full((2, 3), 1 / 3, dtype=torch.float64)), name


def test_validation_drops_teachers_at_chance() -> None:
    ctx = TeacherContext(CTX.num_examples, CTX.label_counts,
                         val_scores=torch.tensor([0.9, 0.3, 0.6]))
    w = make_weighting("validation")(LOGITS, ctx)
    assert torch.allclose(w, torch.tensor([[0.6, 0.0, 0.4]] * 2, dtype=torch.float64))
    w_keep = make_weighting("validation", {"drop_below_chance": False})(LOGITS, ctx)
    assert torch.allclose(w_keep, torch.tensor([[0.5, 0.5 / 3, 1 / 3]] * 2,
                                               dtype=torch.float64))
    all_bad = TeacherContext(CTX.num_examples, CTX.label_counts,
                             val_scores=torch.tensor([0.1, 0.2, 0.0]))
    assert torch.allclose(make_weighting("validation")(LOGITS, all_bad),
                          torch.full((2, 3), 1 / 3, dtype=torch.float64))


def test_validation_scores_from_logits_and_missing_split() -> None:
    val_logits = LOGITS  # treat the 2 samples as the validation split
    ctx = TeacherContext(CTX.num_examples, CTX.label_counts, val_logits=val_logits,
                         val_labels=torch.tensor([0, 1]))
    # argmax ties go to the first class: teacher 0 misses sample 1, the others get both
    assert torch.equal(ctx.scores(), torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="val_fraction"):
        make_weighting("validation")(LOGITS, CTX)


def test_agreement_down_weights_the_outlier() -> None:
    logits = torch.tensor([[[3.0, 0.0]], [[3.0, 0.0]], [[0.0, 3.0]]], dtype=torch.float64)
    w = make_weighting("agreement", {"temperature": 1.0})(logits, CTX)
    assert w[0, 0] == w[0, 1] > w[0, 2]
    logp = torch.log_softmax(logits, dim=2)
    mean = logp.exp().mean(dim=0, keepdim=True)
    kl = (mean * (mean.log() - logp)).sum(dim=2)
    assert torch.allclose(w, torch.softmax(-kl.T, dim=1))


def test_learned_finds_the_good_teacher() -> None:
    labels = torch.tensor([0, 1, 0, 1])
    good = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
    bad = torch.tensor([[0.0, 4.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    val_logits = torch.stack([bad, good]).to(torch.float64)
    ctx = TeacherContext(torch.tensor([1, 1]), torch.ones(2, 2), val_logits=val_logits,
                         val_labels=labels)
    learned = make_weighting("learned", {"steps": 200, "lr": 0.1})
    w = learned(val_logits[:, :1], ctx)
    assert w.shape == (1, 2) and w[0, 1] > 0.95
    assert torch.equal(learned(val_logits[:, :1], ctx), w)  # deterministic
    zero = make_weighting("learned", {"steps": 0})(val_logits[:, :1], ctx)
    assert torch.equal(zero, torch.full((1, 2), 0.5, dtype=torch.float64))


def test_unknown_name_and_bad_params_are_scenario_errors() -> None:
    with pytest.raises(ScenarioError) as exc:
        make_weighting("loudest")
    assert exc.value.path == "strategy.params.weighting"
    with pytest.raises(ScenarioError) as exc:
        make_weighting("entropy", {"temperature": 0})
    assert exc.value.path == "strategy.params.weighting_params"
    with pytest.raises(ScenarioError) as exc:
        make_weighting("entropy", {"temp": 1})
    assert exc.value.path == "strategy.params.weighting_params.temp"


def test_registry_lists_every_weighting() -> None:
    assert WEIGHTINGS.names() == ["agreement", "class_counts", "confidence", "data_size",
                                  "entropy", "learned", "uniform", "validation"]


def test_weight_rows_mean_and_per_class() -> None:
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    rows = weight_rows([7, 9], w, classes=torch.tensor([1, 1, 0]))
    assert rows == [
        {"client": 7, "class": -1, "weight": pytest.approx(1.75 / 3)},
        {"client": 9, "class": -1, "weight": pytest.approx(1.25 / 3)},
        {"client": 7, "class": 0, "weight": 1.0}, {"client": 9, "class": 0, "weight": 0.0},
        {"client": 7, "class": 1, "weight": 0.375}, {"client": 9, "class": 1, "weight": 0.625},
    ]
    assert len(weight_rows([7, 9], w)) == 2


def _split(n: int) -> TensorSplit:
    return TensorSplit(torch.zeros(n, 2), torch.zeros(n, dtype=torch.int64))


def test_only_validation_and_learned_use_labels() -> None:
    flagged = [n for n in WEIGHTINGS.names() if uses_labels(make_weighting(n))]
    assert flagged == ["learned", "validation"]


def test_weighting_split_prefers_the_separate_weight_split() -> None:
    val, weight = _split(4), _split(3)
    bundle = DataBundle(pool=_split(10), test=_split(2), val=val, public=None,
                        public_labeled=False, num_classes=2, input_shape=(2,), name="toy")
    assert weighting_split(bundle) == (val, True)  # data.weight_fraction 0: shares val
    split, shared = weighting_split(DataBundle(**{**bundle.__dict__, "weight": weight}))
    assert split is weight and shared is False
    assert weighting_split(DataBundle(**{**bundle.__dict__, "val": None})) == (None, True)


def test_label_using_weightings_name_both_splits_when_none_is_given() -> None:
    for name in ("validation", "learned"):
        with pytest.raises(ValueError, match="data.weight_fraction > 0 or data.val_fraction"):
            make_weighting(name)(LOGITS, CTX)
