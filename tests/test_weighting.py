"""Each teacher weighting pinned on toy logits with exact numbers."""

from __future__ import annotations

import dataclasses
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
    assert WEIGHTINGS.names() == ["agreement", "certainty", "class_counts", "confidence",
                                  "data_size", "entropy", "kt_pfl", "learned", "oracle",
                                  "per_class_validation", "uniform", "validation", "variance"]


def _split(n: int) -> TensorSplit:
    return TensorSplit(torch.zeros(n, 2), torch.zeros(n, dtype=torch.int64))


def test_only_validation_and_learned_use_labels() -> None:
    flagged = [n for n in WEIGHTINGS.names() if uses_labels(make_weighting(n))]
    assert flagged == ["learned", "per_class_validation", "validation"]


def test_weighting_split_prefers_the_separate_weight_split() -> None:
    val, weight = _split(4), _split(3)
    bundle = DataBundle(pool=_split(10), test=_split(2), val=val, public=None,
                        public_labeled=False, num_classes=2, input_shape=(2,), name="toy")
    assert weighting_split(bundle) == (val, True)  # data.weight_fraction 0: shares val
    split, shared = weighting_split(DataBundle(**{**bundle.__dict__, "weight": weight}))
    assert split is weight and shared is False
    assert weighting_split(DataBundle(**{**bundle.__dict__, "val": None})) == (None, True)


def test_label_using_weightings_name_both_splits_when_none_is_given() -> None:
    for name in ("validation", "learned", "per_class_validation"):
        with pytest.raises(ValueError, match="data.weight_fraction > 0 or data.val_fraction"):
            make_weighting(name)(LOGITS, CTX)


# --- per_class_validation, variance, oracle -----------------------------------------------

def _onehot_logits(pred: list[list[int]], num_classes: int = 3) -> torch.Tensor:
    """``(K, N, C)`` logits with 3.0 on each teacher's predicted class (0 elsewhere)."""
    return 3.0 * torch.nn.functional.one_hot(torch.tensor(pred), num_classes).to(torch.float64)


VAL_LABELS = torch.tensor([0, 0, 1, 1])  # class 2 has no validation sample
VAL_LOGITS = _onehot_logits([
    [1, 2, 0, 2],  # teacher 0: wrong on every sample
    [0, 0, 0, 0],  # teacher 1: never predicts class 1 (held no sample of it)
    [0, 1, 1, 1],  # teacher 2: one miss on class 0
])
VAL_CTX = TeacherContext(torch.ones(3), torch.ones(3, 3), val_logits=VAL_LOGITS,
                         val_labels=VAL_LABELS)
#: three weighted samples on which every teacher predicts class 0, 1, 2 in turn
SAME = _onehot_logits([[0, 1, 2]] * 3)


def test_per_class_validation_class_accuracy_by_hand() -> None:
    acc = make_weighting("per_class_validation").class_accuracy(VAL_LOGITS, VAL_LABELS, 3)
    # class 0: 0/2, 2/2, 1/2; class 1: 0/2, 0/2, 2/2; class 2 (no sample): overall 0, 2/4, 3/4
    assert torch.equal(acc, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 1.0], [0.0, 0.5, 0.75]],
                                         dtype=torch.float64))


def test_per_class_validation_weights_given_and_predicted_labels() -> None:
    pcv = make_weighting("per_class_validation")
    w = pcv(SAME, VAL_CTX, labels=torch.tensor([0, 1, 2]))
    expected = torch.tensor([[0.0, 2 / 3, 1 / 3],   # all-wrong teacher 0 gets nothing
                             [0.0, 0.0, 1.0],       # teacher 1 never got class 1 right
                             [0.0, 0.4, 0.6]],      # no class-2 sample: overall accuracy
                            dtype=torch.float64)
    assert torch.allclose(w, expected)
    rows_sum_to_one(w)
    # without labels the uniform ensemble predicts classes 0, 1, 2 on these samples
    assert torch.equal(pcv(SAME, VAL_CTX), w)
    assert torch.equal(pcv(SAME, VAL_CTX, labels=torch.tensor([1, 1, 0])), expected[[1, 1, 0]])


def test_per_class_validation_zero_class_is_uniform_and_floor_smooths() -> None:
    all_miss_class_1 = _onehot_logits([[1, 2, 0, 2], [0, 0, 0, 0], [0, 0, 0, 2]])
    ctx = TeacherContext(torch.ones(3), torch.ones(3, 3), val_logits=all_miss_class_1,
                         val_labels=VAL_LABELS)
    w = make_weighting("per_class_validation")(SAME, ctx)
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3],
                                           [0.0, 0.5, 0.5]], dtype=torch.float64))
    floored = make_weighting("per_class_validation", {"floor": 1.0})(SAME, VAL_CTX)
    assert torch.allclose(floored, torch.tensor([[1 / 4.5, 2 / 4.5, 1.5 / 4.5],
                                                 [0.25, 0.25, 0.5],
                                                 [1 / 4.25, 1.5 / 4.25, 1.75 / 4.25]],
                                                dtype=torch.float64))


def test_per_class_validation_identical_teachers_and_dtype() -> None:
    same_val = VAL_LOGITS[2:].expand(3, -1, -1)
    ctx = TeacherContext(torch.ones(3), torch.ones(3, 3), val_logits=same_val,
                         val_labels=VAL_LABELS)
    w = make_weighting("per_class_validation")(SAME.to(torch.float32), ctx)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.full((3, 3), 1 / 3))


def _variance_by_hand(p: list[list[float]], temperature: float, penalty: float) -> list[float]:
    """One sample's variance weights from the teachers' probability vectors ``p``, in plain
    Python: softmax of (max prob - penalty * squared distance from the confidence-weighted
    consensus) / T."""
    def softmax(v: list[float]) -> list[float]:
        e = [math.exp(x / temperature) for x in v]
        return [x / sum(e) for x in e]

    conf = [max(pk) for pk in p]
    w0 = softmax(conf)
    q = [sum(w0[k] * p[k][c] for k in range(len(p))) for c in range(len(p[0]))]
    spread = [sum((pk[c] - q[c]) ** 2 for c in range(len(q))) for pk in p]
    return softmax([conf[k] - penalty * spread[k] for k in range(len(p))])


def test_variance_down_weights_the_confident_dissenter() -> None:
    # teachers 0 and 1 agree on both samples; teacher 2 is confidently wrong on both
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, 2.0]],
                           [[0.0, 4.0], [4.0, 0.0]]], dtype=torch.float64)
    conf = make_weighting("confidence", {"temperature": 1.0})(logits, CTX)
    assert (conf.argmax(dim=1) == 2).all()  # confidence alone trusts the dissenter most
    w = make_weighting("variance", {"temperature": 1.0, "penalty": 1.0})(logits, CTX)
    a, b = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-4))
    expected = _variance_by_hand([[a, 1 - a], [a, 1 - a], [1 - b, b]], 1.0, 1.0)
    assert torch.allclose(w, torch.tensor([expected] * 2, dtype=torch.float64))
    assert (w.argmin(dim=1) == 2).all() and torch.equal(w[:, 0], w[:, 1])
    assert w[0, 2].item() == pytest.approx(0.2650, abs=1e-4)
    rows_sum_to_one(w)


def test_variance_without_penalty_is_confidence_and_identical_teachers_are_uniform() -> None:
    for t in (0.1, 0.5, 2.0):
        assert torch.equal(make_weighting("variance", {"temperature": t, "penalty": 0.0})(
            LOGITS, CTX), make_weighting("confidence", {"temperature": t})(LOGITS, CTX))
    w = make_weighting("variance", {"temperature": 0.5, "penalty": 2.0})(LOGITS, CTX)
    p = torch.softmax(LOGITS, dim=2).tolist()
    for n in range(2):
        expected = _variance_by_hand([p[k][n] for k in range(3)], 0.5, 2.0)
        assert w[n].tolist() == pytest.approx(expected)
    same = LOGITS[:1].expand(3, -1, -1).to(torch.float32)
    w32 = make_weighting("variance")(same, CTX)
    assert w32.dtype == torch.float32
    assert torch.allclose(w32, torch.full((2, 3), 1 / 3))


def test_oracle_weights_by_the_probability_of_the_true_label() -> None:
    truth = torch.tensor([0, 1])
    ctx = dataclasses.replace(CTX, truth=truth)
    w = make_weighting("oracle", {"temperature": 1.0})(LOGITS, ctx)
    e = math.e
    p0 = [e**2 / (e**2 + 2), 1 / 3, e / (2 * e + 1)]   # p_k(0 | x_0)
    p1 = [1 / 3, e**3 / (e**3 + 2), e / (e + 2)]       # p_k(1 | x_1)
    assert w[0].tolist() == pytest.approx([x / sum(p0) for x in p0])
    assert w[1].tolist() == pytest.approx([x / sum(p1) for x in p1])
    sharp = make_weighting("oracle", {"temperature": 0.5})(LOGITS, ctx)
    assert sharp[1].tolist() == pytest.approx([x**2 / sum(y**2 for y in p1) for x in p1])
    rows_sum_to_one(sharp)
    # the true labels win over given labels; given labels are the fallback
    oracle = make_weighting("oracle", {"temperature": 1.0})
    assert torch.equal(oracle(LOGITS, ctx, labels=torch.tensor([1, 0])), w)
    assert torch.equal(oracle(LOGITS, CTX, labels=truth), w)


def test_oracle_all_wrong_teacher_identical_teachers_and_missing_labels() -> None:
    logits = torch.tensor([[[3.0, 0.0], [0.0, 3.0]], [[0.0, 3.0], [3.0, 0.0]]],
                          dtype=torch.float32)  # teacher 1 is wrong on both samples
    ctx = dataclasses.replace(CTX, truth=torch.tensor([0, 1]))
    w = make_weighting("oracle")(logits, ctx)  # T = 0.1: w_1 = 1 / (1 + e^(3 / 0.1))
    assert w.dtype == torch.float32
    assert w[:, 1].tolist() == pytest.approx([1 / (1 + math.exp(30))] * 2, rel=1e-4)
    rows_sum_to_one(w)
    same = logits[:1].expand(3, -1, -1)
    assert torch.allclose(make_weighting("oracle")(same, ctx), torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="the oracle weighting needs the true labels"):
        make_weighting("oracle")(LOGITS, CTX)


def test_only_the_oracle_is_an_upper_bound() -> None:
    marked = [n for n in WEIGHTINGS.names() if getattr(WEIGHTINGS.get(n), "upper_bound", False)]
    assert marked == ["oracle"]
    assert not uses_labels(make_weighting("oracle"))


@pytest.mark.parametrize(("name", "params"), [
    ("per_class_validation", {"floor": -0.1}), ("variance", {"temperature": 0}),
    ("variance", {"penalty": -1}), ("oracle", {"temperature": -1.0}),
])
def test_new_weightings_bad_params_are_scenario_errors(name: str,
                                                       params: dict[str, float]) -> None:
    with pytest.raises(ScenarioError) as exc:
        make_weighting(name, params)
    assert exc.value.path == "strategy.params.weighting_params"


def test_fedkd_list_marks_the_upper_bound(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fedkd.engine.simulate
    from fedkd.cli import main

    monkeypatch.setattr(fedkd.engine.simulate, "interrupt_on_sigterm", lambda: None)
    assert main(["list"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("weightings:"))
    names = line.removeprefix("weightings: ").split(", ")
    assert "oracle (upper bound: uses the true labels; not a method)" in names
    assert "per_class_validation" in names and "variance" in names and "uniform" in names
    assert sum("upper bound" in n for n in names) == 1


def test_era_composes_with_any_weighting() -> None:
    from fedkd.distill import era
    from strategies.weighting import Sharpened, sharpen_targets

    plain = make_weighting("confidence", {"temperature": 1.0})
    sharp = make_weighting("confidence", {"temperature": 1.0, "era_temperature": 0.1})
    assert isinstance(sharp, Sharpened) and sharp.era_temperature == 0.1
    assert torch.equal(sharp(LOGITS, CTX), plain(LOGITS, CTX))  # the weights are the base's
    assert sharp.temperature == 1.0 and not uses_labels(sharp)
    assert uses_labels(make_weighting("learned", {"era_temperature": 0.5}))
    probs = torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64)
    expected = torch.softmax(probs / 0.1, dim=1)  # DS-FL: softmax of probabilities over T
    assert torch.allclose(sharpen_targets(sharp, probs, "probs"), expected)
    assert torch.allclose(expected[0], torch.tensor([0.946499, 0.047123, 0.006378],
                                                    dtype=torch.float64), atol=1e-6)
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    as_logits = sharpen_targets(sharp, logits, "logits")
    assert torch.allclose(torch.softmax(as_logits, dim=1), era(torch.softmax(logits, 1), 0.1))
    assert torch.equal(sharpen_targets(plain, probs, "probs"), probs)  # no ERA: unchanged
    for bad in (0, -1.0, True, "x"):
        with pytest.raises(ScenarioError) as exc:
            make_weighting("uniform", {"era_temperature": bad})
        assert exc.value.path == "strategy.params.weighting_params.era_temperature"
