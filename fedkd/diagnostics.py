"""Teacher-ensemble diagnostics: why a multi-teacher weighting helps or hurts.

Every ensemble in fedkd (FedDF's proxy targets, FedMD's consensus, DML's peer targets,
FedGen's and FedFTG's generator ensembles) hands its ``(K, N, C)`` teacher logits, the
``(N, K)`` weights its weighting gave and, where the simulator knows them, the samples' true
labels to :meth:`TeacherLog.record`. The log keeps, per round:

- summary metrics (``teach-<name>``, or ``teach-val-<name>`` on the server validation
  split), written to ``metrics.parquet``:

  ===============  ==========================================================================
  ``acc-mean``     mean teacher accuracy; ``acc-best`` the best teacher's
  ``ens-acc``      accuracy of the weighted ensemble's prediction
  ``ens-ece``      its expected calibration error (15 equal-width bins; Guo et al., ICML 2017)
  ``w-entropy``    mean per-sample entropy of the weights over ``log K`` (1: uniform)
  ``eff-k``        mean effective number of teachers ``1 / Σ_k w_nk²`` (Kish; K: uniform)
  ``w-correct``    mean weight on the teachers that are right, ``mean_n Σ_k w_nk 1[k right]``
  ``w-align``      ``w-correct`` minus its value under uniform weights (the weighting's gain)
  ``w-auc``        AUC of weight vs correctness over the (right, wrong) teacher pairs of each
                   sample (0.5: the weights do not tell right from wrong teachers; 1: every
                   right teacher outweighs every wrong one on its sample)
  ``disagree``     mean pairwise disagreement of the teachers' predicted classes
  ``kl``           mean over teachers of ``KL(p_k ‖ p_ens)``
  ===============  ==========================================================================

  The label-free ones (``w-entropy``, ``eff-k``, ``disagree``, ``kl``) are recorded always,
  the others when the labels are known;
- rows for ``teachers.parquet``: per teacher (``client``; ``-1``: the ensemble) and per
  class (``class``; ``-1``: all samples), its mean ``weight`` (None for the ensemble) and
  its ``acc``uracy (None when the labels are unknown), and the ``source`` of the samples
  (``proxy``, ``public``, ``generated`` or ``val``). A metric that is undefined on a round
  (``w-auc`` when every teacher is right on every sample) is left out of that round.

The computation is pure tensor arithmetic on what the ensemble already produced: it draws no
random numbers and changes nothing that training sees (a test pins identical metrics with
``server.teacher_diagnostics`` on and off).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Bins of the expected calibration error.
ECE_BINS = 15
#: Weights closer than this count as tied in the AUC.
TIE = 1e-12


def ensemble_probs(logits: torch.Tensor, weights: torch.Tensor,
                   ensemble: str = "probs") -> torch.Tensor:
    """``(N, C)`` probabilities of the weighted ensemble: ``Σ_k w_nk softmax(z_k)``
    (``"probs"``) or ``softmax(Σ_k w_nk z_k)`` (``"logits"``)."""
    z = logits.to(torch.float64)
    w = weights.to(torch.float64).T.unsqueeze(2)  # (K, N, 1)
    if ensemble == "logits":
        return torch.softmax((w * z).sum(dim=0), dim=1)
    return (w * torch.softmax(z, dim=2)).sum(dim=0)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    """``Σ_b |B_b| / N · |acc(B_b) − conf(B_b)|`` over equal-width confidence bins
    ``((b-1)/bins, b/bins]`` (Guo et al., 2017)."""
    conf, pred = probs.max(dim=1)
    index = (conf * bins).ceil().long().clamp(1, bins) - 1
    right = (pred == labels).to(torch.float64)
    # |B| · |acc(B) − conf(B)| = |Σ_B 1[right] − Σ_B conf|
    acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, right)
    cf = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf.to(torch.float64))
    return float((acc - cf).abs().sum() / len(labels))


def weight_auc(weights: torch.Tensor, correct: torch.Tensor, chunk: int = 1 << 22) -> float:
    """AUC of per-sample teacher weight as a score for "this teacher is right".

    Over every sample's pairs (teacher ``k`` right, teacher ``j`` wrong):
    ``P(w_nk > w_nj) + ½ P(w_nk = w_nj)``. Samples where all teachers are right, or all
    wrong, have no pairs; nan when no sample has one.
    """
    n, k = weights.shape
    w = weights.to(torch.float64)
    wins = pairs = 0.0
    step = max(1, chunk // max(k * k, 1))
    for s in range(0, n, step):
        ws, cs = w[s:s + step], correct[s:s + step]
        diff = ws.unsqueeze(2) - ws.unsqueeze(1)  # diff[n, a, b] = w_na - w_nb
        mask = (cs.unsqueeze(2) & ~cs.unsqueeze(1)).to(torch.float64)
        score = (diff > TIE).to(torch.float64) + 0.5 * (diff.abs() <= TIE).to(torch.float64)
        wins += float((score * mask).sum())
        pairs += float(mask.sum())
    return wins / pairs if pairs else math.nan


def disagreement(preds: torch.Tensor, num_classes: int) -> float:
    """Mean over teacher pairs and samples of ``1[pred_k ≠ pred_j]``; 0 for one teacher."""
    k, n = preds.shape
    if k < 2:
        return 0.0
    counts = torch.zeros(n, num_classes, dtype=torch.float64)
    counts.scatter_add_(1, preds.T, torch.ones(n, k, dtype=torch.float64))
    agree = (counts * (counts - 1) / 2).sum(dim=1)
    return float(1 - (agree / (k * (k - 1) / 2)).mean())


@dataclass(frozen=True)
class Diagnosis:
    """One ensemble's diagnostics: ``summary`` metrics (names without prefix) and ``rows``
    for ``teachers.parquet`` (without ``round``)."""

    summary: dict[str, float]
    rows: list[dict[str, Any]]


def diagnose(logits: torch.Tensor, weights: torch.Tensor, cids: Sequence[int],
             labels: torch.Tensor | None = None, *, ensemble: str = "probs",
             source: str = "proxy", per_class: bool = True) -> Diagnosis:
    """Diagnostics of one weighted teacher ensemble (see the module docstring).

    Parameters
    ----------
    logits : torch.Tensor
        ``(K, N, C)`` teacher logits.
    weights : torch.Tensor
        ``(N, K)`` weights the ensemble used (rows sum to 1).
    cids : Sequence[int]
        The K teachers' client ids.
    labels : torch.Tensor, optional
        ``(N,)`` true labels (None: only the label-free metrics and weight rows).
    ensemble : str
        How the ensemble combines its teachers (:func:`ensemble_probs`).
    source : str
        What the samples are (recorded in the rows).
    per_class : bool
        Add per-class rows (teacher weight and accuracy, ensemble accuracy per true class).

    Returns
    -------
    Diagnosis
    """
    k, n, c = logits.shape
    z = logits.detach().to(torch.float64).cpu()
    w = weights.detach().to(torch.float64).cpu()
    p = torch.softmax(z, dim=2)
    q = ensemble_probs(z, w, ensemble)
    entropy = -(w * w.clamp_min(1e-300).log()).sum(dim=1)
    kl = (p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log().unsqueeze(0))).sum(2)
    preds = z.argmax(dim=2)  # (K, N)
    summary = {
        # clamped: float32 weights that are uniform can round to just above log K
        "w-entropy": min(1.0, float((entropy / math.log(k)).mean())) if k > 1 else 1.0,
        "eff-k": float((1 / (w * w).sum(dim=1)).mean()),
        "disagree": disagreement(preds, c),
        "kl": float(kl.mean()),
    }
    mean_w = w.mean(dim=0)
    if labels is None:
        rows = [{"client": int(cid), "class": -1, "weight": float(m), "acc": None,
                 "source": source} for cid, m in zip(cids, mean_w, strict=True)]
        return Diagnosis(summary, rows)
    y = labels.detach().cpu().long()
    correct = (preds == y).T  # (N, K)
    acc = correct.to(torch.float64).mean(dim=0)
    ens_right = q.argmax(dim=1) == y
    w_correct = float((w * correct).sum(dim=1).mean())
    summary.update({
        "acc-mean": float(acc.mean()), "acc-best": float(acc.max()),
        "ens-acc": float(ens_right.to(torch.float64).mean()),
        "ens-ece": expected_calibration_error(q, y),
        "w-correct": w_correct,
        "w-align": w_correct - float(correct.to(torch.float64).mean()),
        "w-auc": weight_auc(w, correct),
    })
    rows = _rows(cids, mean_w, acc, float(ens_right.to(torch.float64).mean()), -1, source)
    if per_class:
        for cls in y.unique().tolist():
            m = y == cls
            rows += _rows(cids, w[m].mean(dim=0), correct[m].to(torch.float64).mean(dim=0),
                          float(ens_right[m].to(torch.float64).mean()), int(cls), source)
    return Diagnosis(summary, rows)


def _rows(cids: Sequence[int], weight: torch.Tensor, acc: torch.Tensor, ens_acc: float,
          cls: int, source: str) -> list[dict[str, Any]]:
    rows = [{"client": int(cid), "class": cls, "weight": float(wk), "acc": float(ak),
             "source": source} for cid, wk, ak in zip(cids, weight, acc, strict=True)]
    return [*rows, {"client": -1, "class": cls, "weight": None, "acc": ens_acc,
                    "source": source}]


def mean_summary(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of several ensembles' summaries (nan ignored)."""
    keys = dict.fromkeys(key for s in parts for key in s)
    out = {}
    for key in keys:
        vals = [s[key] for s in parts if key in s and not math.isnan(s[key])]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    return out


@dataclass
class Batches:
    """The last ``cap`` samples an ensemble labelled over many batches (a generator's
    round), for one :meth:`TeacherLog.record` at the end of the round."""

    cap: int = 4096
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep one batch: ``(K, B, C)`` logits, ``(B, K)`` weights, ``(B,)`` labels."""
        self.parts.append((logits.detach().cpu(), weights.detach().cpu(), labels.detach().cpu()))
        while sum(len(p[2]) for p in self.parts[1:]) >= self.cap:
            self.parts.pop(0)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The kept samples' logits, weights and labels (None if no batch was added)."""
        if not self.parts:
            return None
        logits, weights, labels = zip(*self.parts, strict=True)
        return torch.cat(logits, dim=1), torch.cat(weights), torch.cat(labels)


@dataclass
class TeacherLog:
    """A strategy's record of its teacher ensembles, per round.

    Attributes
    ----------
    enabled : bool
        Compute the diagnostics (``server.teacher_diagnostics``); when off only the teachers'
        mean weights are kept, as rows without ``acc``.
    rows : dict[int, list[dict]]
        ``teachers.parquet`` rows of each round.
    metrics : dict[int, dict[str, float]]
        Summary metrics of each round (prefixed names, e.g. ``teach-ens-acc``).
    """

    enabled: bool = True
    rows: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)

    def record(self, server_round: int, cids: Sequence[int], logits: torch.Tensor,
               weights: torch.Tensor, labels: torch.Tensor | None = None, *,
               ensemble: str = "probs", source: str = "proxy", per_class: bool = True,
               ) -> None:
        """Diagnose one ensemble (:func:`diagnose`) and keep its rows and metrics; the
        ``val`` source is prefixed ``teach-val-``, every other ``teach-``."""
        if not self.enabled:
            self.weights(server_round, cids, weights.detach().to(torch.float64).mean(0), source)
            return
        d = diagnose(logits, weights, cids, labels, ensemble=ensemble, source=source,
                     per_class=per_class)
        self.add(server_round, d)

    def add(self, server_round: int, d: Diagnosis) -> None:
        """Keep a computed :class:`Diagnosis` (several per round: one per source)."""
        source = d.rows[0]["source"] if d.rows else "proxy"
        prefix = "teach-val-" if source == "val" else "teach-"
        self.rows.setdefault(server_round, []).extend(d.rows)
        self.metrics.setdefault(server_round, {}).update(
            {prefix + key: v for key, v in d.summary.items() if not math.isnan(v)})

    def weights(self, server_round: int, cids: Sequence[int], mean_weights: Sequence[float]
                | torch.Tensor, source: str = "proxy") -> None:
        """Keep the teachers' mean weights only (no logits to diagnose)."""
        self.rows.setdefault(server_round, []).extend(
            {"client": int(cid), "class": -1, "weight": float(m), "acc": None,
             "source": source} for cid, m in zip(cids, mean_weights, strict=True))

    def teacher_weights(self, server_round: int) -> list[dict[str, Any]]:
        """The round's per-teacher rows over all samples (``client >= 0``, ``class -1``)."""
        return [r for r in self.rows.get(server_round, [])
                if r["client"] >= 0 and r["class"] == -1 and r["source"] != "val"]
