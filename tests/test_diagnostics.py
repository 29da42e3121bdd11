"""Teacher diagnostics exact on a hand-made 3-teacher batch."""

from __future__ import annotations

import math

import pytest
import torch

from fedkd.diagnostics import (
    TeacherLog,
    diagnose,
    disagreement,
    expected_calibration_error,
    weight_auc,
)

LABELS = torch.tensor([0, 1, 2, 0])
PREDS = torch.tensor([[0, 1, 2, 1],    # teacher 0: right, right, right, wrong
                      [0, 0, 2, 0],    # teacher 1: right, wrong, right, right
                      [1, 1, 1, 1]])   # teacher 2: wrong, right, wrong, wrong
LOGITS = 4.0 * torch.nn.functional.one_hot(PREDS, 3).to(torch.float64)  # (3, 4, 3)
WEIGHTS = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.0, 0.5], [1 / 3, 1 / 3, 1 / 3],
                        [0.2, 0.6, 0.2]], dtype=torch.float64)
CIDS = [7, 8, 9]


def slow_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """The calibration error written as a plain loop over bins."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i in range(len(labels))
                   if lo < float(probs[i].max()) <= hi or (b == 0 and float(probs[i].max()) == 0)]
        if members:
            acc = sum(int(probs[i].argmax()) == int(labels[i]) for i in members) / len(members)
            conf = sum(float(probs[i].max()) for i in members) / len(members)
            total += len(members) / len(labels) * abs(acc - conf)
    return total


def test_summary_exact() -> None:
    d = diagnose(LOGITS, WEIGHTS, CIDS, LABELS)
    s = d.summary
    assert s["acc-mean"] == pytest.approx((0.75 + 0.75 + 0.25) / 3)
    assert s["acc-best"] == pytest.approx(0.75)
    # weight on right teachers per sample: 0.75, 1, 2/3, 0.6; uniform: 2/3, 2/3, 2/3, 1/3
    assert s["w-correct"] == pytest.approx((0.75 + 1 + 2 / 3 + 0.6) / 4)
    assert s["w-align"] == pytest.approx((0.75 + 1 + 2 / 3 + 0.6) / 4 - 7 / 12)
    # (right, wrong) pairs: 1 win + 1 tie, 2 wins, 2 ties, 2 wins -> 6.5 of 8
    assert s["w-auc"] == pytest.approx(6.5 / 8)
    assert s["eff-k"] == pytest.approx((1 / 0.375 + 2 + 3 + 1 / 0.44) / 4)
    ent = [-sum(x * math.log(x) for x in row if x > 0) / math.log(3) for row in WEIGHTS.tolist()]
    assert s["w-entropy"] == pytest.approx(sum(ent) / 4)
    assert s["disagree"] == pytest.approx(2 / 3)
    p = torch.softmax(LOGITS, dim=2)
    q = torch.einsum("nk,knc->nc", WEIGHTS, p)
    assert s["ens-acc"] == pytest.approx(float((q.argmax(1) == LABELS).double().mean()))
    assert s["ens-acc"] == 1.0  # the weighted vote is right on every sample
    assert s["ens-ece"] == pytest.approx(slow_ece(q, LABELS))
    kl = sum(float((p[k, i] * (p[k, i] / q[i]).log()).sum()) for k in range(3) for i in range(4))
    assert s["kl"] == pytest.approx(kl / 12)


def test_rows_per_teacher_class_and_ensemble() -> None:
    d = diagnose(LOGITS, WEIGHTS, CIDS, LABELS, source="proxy")
    overall = [r for r in d.rows if r["class"] == -1]
    assert [r["client"] for r in overall] == [7, 8, 9, -1]
    assert [r["acc"] for r in overall] == pytest.approx([0.75, 0.75, 0.25, 1.0])
    assert [r["weight"] for r in overall[:3]] == pytest.approx(WEIGHTS.mean(0).tolist())
    assert overall[3]["weight"] is None
    zero = {r["client"]: r for r in d.rows if r["class"] == 0}
    # class 0 is samples 0 and 3: teacher 0 right once, teacher 1 twice, teacher 2 never
    assert [zero[c]["acc"] for c in CIDS] == pytest.approx([0.5, 1.0, 0.0])
    assert [zero[c]["weight"] for c in CIDS] == pytest.approx([0.35, 0.425, 0.225])
    assert {r["source"] for r in d.rows} == {"proxy"}
    assert {r["class"] for r in d.rows} == {-1, 0, 1, 2}


def test_without_labels_only_label_free_metrics() -> None:
    d = diagnose(LOGITS, WEIGHTS, CIDS)
    assert set(d.summary) == {"w-entropy", "eff-k", "disagree", "kl"}
    assert all(r["acc"] is None for r in d.rows) and len(d.rows) == 3


def test_uniform_weights_are_uninformative() -> None:
    uniform = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    s = diagnose(LOGITS, uniform, CIDS, LABELS).summary
    assert s["w-auc"] == pytest.approx(0.5)
    assert s["w-align"] == pytest.approx(0.0)
    assert s["w-entropy"] == pytest.approx(1.0) and s["eff-k"] == pytest.approx(3.0)


def test_pieces() -> None:
    assert math.isnan(weight_auc(WEIGHTS, torch.ones(4, 3, dtype=torch.bool)))
    assert weight_auc(WEIGHTS, (PREDS == LABELS).T, chunk=9) == pytest.approx(6.5 / 8)
    assert disagreement(PREDS[:1], 3) == 0.0
    probs = torch.tensor([[1.0, 0.0], [0.6, 0.4]], dtype=torch.float64)
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == pytest.approx(0.5 * 0.6)


def test_log_prefixes_val_and_disabled_keeps_weights_only() -> None:
    log = TeacherLog()
    log.record(3, CIDS, LOGITS, WEIGHTS, LABELS)
    log.record(3, CIDS, LOGITS, WEIGHTS, LABELS, source="val")
    assert log.metrics[3]["teach-w-auc"] == log.metrics[3]["teach-val-w-auc"]
    assert [r["client"] for r in log.teacher_weights(3)] == CIDS
    off = TeacherLog(enabled=False)
    off.record(3, CIDS, LOGITS, WEIGHTS, LABELS)
    assert off.metrics == {} and [r["weight"] for r in off.rows[3]] == pytest.approx(
        WEIGHTS.mean(0).tolist())
