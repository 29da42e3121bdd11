"""Multi-teacher weighting: one plug that every ensemble in fedkd takes its weights from.

A weighting turns the teachers' logits on a batch, plus what the server knows about the
teachers (sample counts, per-class label counts, validation scores), into per-sample,
per-teacher weights ``w[n, k]`` whose rows sum to 1. FedDF's ensemble, FedMD's consensus,
FedGen's and FedFTG's generator ensembles and DML's peer targets all call one.

Add a weighting by registering a class with ``@WEIGHTINGS.register("name")`` whose
constructor keyword arguments are its YAML params, in ``strategies/<name>.py`` (imported on
first use); strategies take ``weighting: name`` and ``weighting_params: {...}``.

Label-using weightings (``uses_labels = True``: ``validation``, ``per_class_validation``,
``learned``) fit on labeled server data, passed as ``TeacherContext.val_logits``/``val_labels``.
Which split that is, :func:`weighting_split` decides: the separate weighting split
(``data.weight_fraction > 0``), disjoint from the validation split FedDF early-stops on, so that
comparing weightings is not confounded by extra labeled data; with ``data.weight_fraction: 0``
they fit on the validation split itself (shared with early stopping), which strategies record
per round as ``weighting-on-val: 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedkd.data.base import TensorSplit
from fedkd.data.bundle import DataBundle
from fedkd.errors import ScenarioError
from fedkd.registry import Registry
from strategies import load_module


@dataclass(frozen=True)
class TeacherContext:
    """What the server knows about K teachers besides their outputs.

    Attributes
    ----------
    num_examples : torch.Tensor
        ``(K,)`` training-set sizes.
    label_counts : torch.Tensor
        ``(K, C)`` training label counts.
    val_scores : torch.Tensor, optional
        ``(K,)`` accuracy of each teacher on the labeled server split of
        :func:`weighting_split`.
    val_logits, val_labels : torch.Tensor, optional
        ``(K, V, C)`` teacher logits on that split and its ``(V,)`` labels (from which
        ``val_scores`` follow, and on which ``learned`` weights are fitted): the weighting
        split when ``data.weight_fraction > 0``, else the validation split.
    cids : torch.Tensor, optional
        ``(K,)`` client ids of the teachers (for weightings that keep per-client state).
    certainty : torch.Tensor, optional
        ``(K, N)`` each teacher's client-side certainty score on each weighted sample
        (FedAUX; uploaded by the clients).
    truth : torch.Tensor, optional
        ``(N,)`` true labels of the weighted samples, known to the simulator only: for the
        ``oracle`` upper bound, never for a method.
    student : int, optional
        Client id of the student the weights are for, when targets are per client (DML's
        leave-one-out, KT-pFL); None for one shared target.
    student_logits : torch.Tensor, optional
        ``(N, C)`` that student's own logits on the weighted samples.
    """

    num_examples: torch.Tensor
    label_counts: torch.Tensor
    val_scores: torch.Tensor | None = None
    val_logits: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    cids: torch.Tensor | None = None
    certainty: torch.Tensor | None = None
    truth: torch.Tensor | None = None
    student: int | None = None
    student_logits: torch.Tensor | None = None

    #: Fields that describe the samples or the student, not one entry per teacher.
    SHARED = ("val_labels", "truth", "student", "student_logits")

    def select(self, keep: torch.Tensor) -> TeacherContext:
        """The context of the teachers selected by the boolean mask ``keep`` (every
        per-teacher field sliced on its first axis; the :attr:`SHARED` ones kept)."""
        per_teacher = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                       if f.name not in self.SHARED and getattr(self, f.name) is not None}
        return dataclasses.replace(self, **{k: v[keep] for k, v in per_teacher.items()})

    @property
    def num_teachers(self) -> int:
        """K."""
        return len(self.num_examples)

    def scores(self) -> torch.Tensor:
        """``(K,)`` validation accuracy: given, or computed from ``val_logits``/``val_labels``."""
        if self.val_scores is not None:
            return self.val_scores.to(torch.float64)
        if self.val_logits is None or self.val_labels is None:
            raise ValueError("this weighting needs the teachers' scores on labeled server data "
                             "(set data.weight_fraction > 0 or data.val_fraction > 0)")
        return (self.val_logits.argmax(dim=2) == self.val_labels).to(torch.float64).mean(dim=1)


class Weighting(Protocol):
    """Turns ``(K, N, C)`` teacher logits into ``(N, K)`` weights (rows sum to 1).

    A class attribute ``uses_labels = True`` marks a weighting that fits on labeled server
    data (``TeacherContext.val_logits``/``val_labels``); see :func:`uses_labels`.
    """

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor: ...


WEIGHTINGS: Registry[Any] = Registry("weighting", loader=load_module)


@WEIGHTINGS.register("uniform")
class Uniform:
    """Every teacher weighs ``1/K`` on every sample."""

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        k, n = logits.shape[0], logits.shape[1]
        return torch.full((n, k), 1.0 / k, dtype=logits.dtype)


def _rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """Broadcast per-teacher ``(K,)`` weights to ``(N, K)`` rows."""
    return w.unsqueeze(0).expand(n, -1).clone()


@WEIGHTINGS.register("data_size")
class DataSize:
    """``w_k = n_k / sum_j n_j``: teachers weigh by their training-set size (FedAvg's rule)."""

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        n = ctx.num_examples.to(torch.float64)
        return _rows(n / n.sum(), logits.shape[1]).to(logits.dtype)


@WEIGHTINGS.register("class_counts")
class ClassCounts:
    """``w[n, k] = n_k(y_n) / n(y_n)`` (FedGen/FedFTG): teachers weigh by how many samples of
    the sample's class they trained on. ``y_n`` is the given (sampled) label, else the
    uniform ensemble's predicted class; a class no teacher holds is uniform."""

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = logits.mean(dim=0).argmax(dim=1)
        return class_weights(ctx.label_counts)[labels].to(logits.dtype)


def _positive_temperature(temperature: float) -> float:
    """The temperature of a per-sample weighting, checked to be > 0."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    return temperature


def _softmax_rows(score: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(K, N)`` scores -> ``(N, K)`` weights ``softmax_k(score / T)``."""
    return torch.softmax(score.T.to(torch.float64) / temperature, dim=1)


@WEIGHTINGS.register("confidence")
class Confidence:
    """Per sample, ``w[n, :] = softmax_k(max_c p_k(c | x_n) / T)``: confident teachers weigh more.

    Parameters
    ----------
    temperature : float
        Lower values concentrate the weight on the most confident teacher.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        self.temperature = _positive_temperature(temperature)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        conf = torch.softmax(logits.to(torch.float64), dim=2).amax(dim=2)
        return _softmax_rows(conf, self.temperature).to(logits.dtype)


@WEIGHTINGS.register("entropy")
class Entropy:
    """Per sample, ``w[n, :] = softmax_k(-H(p_k(. | x_n)) / T)``: low-entropy teachers weigh more.

    Parameters
    ----------
    temperature : float
        Lower values concentrate the weight on the sharpest teacher.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        self.temperature = _positive_temperature(temperature)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        logp = torch.log_softmax(logits.to(torch.float64), dim=2)
        entropy = -(logp.exp() * logp).sum(dim=2)
        return _softmax_rows(-entropy, self.temperature).to(logits.dtype)


@WEIGHTINGS.register("validation")
class Validation:
    """``w_k ∝ acc_k`` on labeled server data (:func:`weighting_split`); teachers at or below
    chance are dropped (FedDF's ``weighted`` / ``drop_worst`` options). All dropped -> uniform.

    Parameters
    ----------
    drop_below_chance : bool
        Give zero weight to teachers whose accuracy is at most ``1 / C``.
    """

    uses_labels = True

    def __init__(self, drop_below_chance: bool = True) -> None:
        self.drop_below_chance = drop_below_chance

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        acc = ctx.scores()
        if self.drop_below_chance:
            acc = torch.where(acc > 1.0 / logits.shape[2], acc, torch.zeros_like(acc))
        w = acc / acc.sum() if acc.sum() > 0 else torch.full_like(acc, 1 / len(acc))
        return _rows(w, logits.shape[1]).to(logits.dtype)


@WEIGHTINGS.register("agreement")
class Agreement:
    """Per sample, ``w[n, :] = softmax_k(-KL(p̄_n ‖ p_k,n) / T)`` with ``p̄`` the uniform
    ensemble's probabilities: teachers far from the consensus (outliers) weigh less.

    Parameters
    ----------
    temperature : float
        Lower values down-weight outliers more sharply.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        self.temperature = _positive_temperature(temperature)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        logp = torch.log_softmax(logits.to(torch.float64), dim=2)
        mean = logp.exp().mean(dim=0, keepdim=True)
        kl = (mean * (mean.clamp_min(1e-300).log() - logp)).sum(dim=2)
        return _softmax_rows(-kl, self.temperature).to(logits.dtype)


@WEIGHTINGS.register("learned")
class Learned:
    """Per-teacher weights on the simplex, ``w = softmax(theta)``, fitted each round to minimise
    the cross-entropy of the weighted-logit ensemble on labeled server data
    (:func:`weighting_split`; Adam from uniform, a fixed number of steps; deterministic).

    Parameters
    ----------
    steps : int
        Optimisation steps per call.
    lr : float
        Adam learning rate on ``theta``.
    """

    uses_labels = True

    def __init__(self, steps: int = 100, lr: float = 0.1) -> None:
        if steps < 0 or lr <= 0:
            raise ValueError("steps must be >= 0 and lr > 0")
        self.steps = steps
        self.lr = lr

    def fit(self, val_logits: torch.Tensor, val_labels: torch.Tensor) -> torch.Tensor:
        """``(K,)`` simplex weights minimising the ensemble's validation cross-entropy."""
        theta = torch.zeros(val_logits.shape[0], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        vl = val_logits.detach().to(torch.float64)
        for _ in range(self.steps):
            opt.zero_grad()
            ens = torch.einsum("k,knc->nc", torch.softmax(theta, dim=0), vl)
            torch.nn.functional.cross_entropy(ens, val_labels).backward()
            opt.step()
        return torch.softmax(theta.detach(), dim=0)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if ctx.val_logits is None or ctx.val_labels is None:
            raise ValueError("the learned weighting needs the teachers' logits on labeled server "
                             "data (set data.weight_fraction > 0 or data.val_fraction > 0)")
        return _rows(self.fit(ctx.val_logits, ctx.val_labels), logits.shape[1]).to(logits.dtype)


@WEIGHTINGS.register("per_class_validation")
class PerClassValidation:
    """``w[n, k] = acc_k(y_n) / sum_j acc_j(y_n)``: each teacher weighs by its accuracy on the
    sample's class, measured on labeled server data (:func:`weighting_split`).

    ``acc_k(c)`` is the fraction of the split's class-``c`` samples that teacher ``k``
    classifies correctly: the diagonal of the teacher's confusion matrix, the per-class
    competence of Dawid & Skene, "Maximum Likelihood Estimation of Observer Error-Rates Using
    the EM Algorithm", Applied Statistics 28(1), 1979 (here counted on labels, not fitted by
    EM). It is ``class_counts`` (FedGen, Zhu et al., ICML 2021) with measured accuracy in place
    of training counts, and FedDF's ``validation`` weighting (Lin et al., NeurIPS 2020) made per
    class. ``y_n`` is the given label, else the uniform ensemble's predicted class (as
    ``class_counts``). A class with no sample in the split uses each teacher's overall accuracy
    on it; a class on which every teacher scores 0 (after ``floor``) is uniform.

    Parameters
    ----------
    floor : float (default: 0.0)
        Added to every accuracy before normalising (>= 0): smooths the weights, so that a
        teacher that never classified a class right keeps some weight on it.
    """

    uses_labels = True

    def __init__(self, floor: float = 0.0) -> None:
        if floor < 0:
            raise ValueError("floor must be >= 0")
        self.floor = floor

    @staticmethod
    def class_accuracy(val_logits: torch.Tensor, val_labels: torch.Tensor,
                       num_classes: int) -> torch.Tensor:
        """``(C, K)`` accuracy of each teacher on each class of a labeled split.

        Parameters
        ----------
        val_logits : torch.Tensor
            ``(K, V, C)`` teacher logits on the split.
        val_labels : torch.Tensor
            ``(V,)`` its labels (V > 0).
        num_classes : int
            C.

        Returns
        -------
        torch.Tensor
            ``acc[c, k]``, float64: the fraction of class-``c`` samples teacher ``k`` predicts
            as ``c``; for a class with no sample, teacher ``k``'s accuracy on the whole split.
        """
        correct = (val_logits.argmax(dim=2) == val_labels).to(torch.float64)  # (K, V)
        onehot = torch.nn.functional.one_hot(val_labels, num_classes).to(torch.float64)  # (V, C)
        per_class = onehot.sum(dim=0).unsqueeze(1)  # (C, 1)
        hits = onehot.T @ correct.T  # (C, K)
        overall = correct.mean(dim=1).expand_as(hits)
        return torch.where(per_class > 0, hits / per_class.clamp_min(1), overall)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if ctx.val_logits is None or ctx.val_labels is None or len(ctx.val_labels) == 0:
            raise ValueError("the per_class_validation weighting needs the teachers' logits on "
                             "labeled server data (set data.weight_fraction > 0 or "
                             "data.val_fraction > 0)")
        acc = self.class_accuracy(ctx.val_logits, ctx.val_labels, logits.shape[2]) + self.floor
        total = acc.sum(dim=1, keepdim=True)
        w = torch.where(total > 0, acc / total.clamp_min(1e-300),
                        torch.full_like(acc, 1 / acc.shape[1]))
        if labels is None:
            labels = logits.mean(dim=0).argmax(dim=1)
        return w[labels].to(logits.dtype)


@WEIGHTINGS.register("variance")
class Variance:
    """Per sample, ``w[n, :] = softmax_k((max_c p_k(c | x_n) - λ·d_k(n)) / T)``: confident
    teachers weigh more, teachers far from the ensemble's confidence-weighted consensus less.

    After Fed-ET's weighted consensus (Cho, Manoel, Joshi, Sim, Dimitriadis, "Heterogeneous
    Ensemble Knowledge Transfer for Training Large Models in Federated Learning", IJCAI 2022,
    arXiv:2204.12703, Sec. 3.2). The spread of teacher ``k`` on ``x_n`` is its squared distance
    from the consensus, ``d_k(n) = ||p_k(. | x_n) - q_n||²`` with ``q_n = sum_k w⁰[n, k] p_k``
    and ``w⁰`` the ``confidence`` weights (``λ = 0``) at the same ``T``; ``sum_k w⁰[n, k]
    d_k(n)`` is the ensemble's variance about its consensus on ``x_n``, of which ``d_k(n)`` is
    teacher ``k``'s share. With ``λ = 0`` this is ``confidence``.

    Where fedkd differs from Fed-ET, and why: Fed-ET measures a teacher's confidence by the
    variance of its output over the classes and mixes the teachers linearly, ``α_k(x) ∝ σ²_k(x)``;
    it distils the server model on the hard label of that weighted consensus (cross-entropy) and
    adds ``λ·KL`` towards the variance-weighted mean of the teachers whose prediction differs
    from the consensus (its diversity regularisation, which keeps what the dissenting teachers
    know rather than discarding it; read in the re-implementation Yoruko-Tang/FedProphet,
    ``src/server/kdserver.py``, which takes ``σ²_k`` over log-probabilities). A fedkd weighting
    returns one mixture per sample, which cannot carry a second target, so here dissent lowers a
    teacher's share of the one target (a soft penalty in place of Fed-ET's hard split and
    separate diversity term), and the confidence is the maximum probability through a softmax at
    temperature ``T``, as in ``confidence``, so that ``λ = 0`` recovers that weighting exactly
    and sweeps over ``λ`` isolate the effect of the disagreement term.

    Parameters
    ----------
    temperature : float (default: 0.1)
        ``T`` (> 0); lower values concentrate the weight on the best-scoring teacher.
    penalty : float (default: 1.0)
        ``λ`` (>= 0), the weight of the spread against the confidence.
    """

    def __init__(self, temperature: float = 0.1, penalty: float = 1.0) -> None:
        self.temperature = _positive_temperature(temperature)
        if penalty < 0:
            raise ValueError("penalty must be >= 0")
        self.penalty = penalty

    def spread(self, prob: torch.Tensor) -> torch.Tensor:
        """``(K, N)`` squared distance of each teacher's ``(K, N, C)`` probabilities from the
        confidence-weighted consensus."""
        w0 = _softmax_rows(prob.amax(dim=2), self.temperature)  # (N, K)
        consensus = torch.einsum("nk,knc->nc", w0, prob)
        return ((prob - consensus) ** 2).sum(dim=2)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        prob = torch.softmax(logits.to(torch.float64), dim=2)
        score = prob.amax(dim=2)
        if self.penalty > 0:
            score = score - self.penalty * self.spread(prob)
        return _softmax_rows(score, self.temperature).to(logits.dtype)


@WEIGHTINGS.register("oracle")
class Oracle:
    """Upper bound, not a method: ``w[n, :] = softmax_k(log p_k(y_n | x_n) / T)``, i.e.
    ``w[n, k] ∝ p_k(y_n | x_n)^(1/T)``, from the true label ``y_n`` of each weighted sample.

    ``y_n`` is ``TeacherContext.truth`` (known to the simulator only), else the given
    ``labels``; without either it raises. No federated method can know the labels of the
    samples it weighs (FedDF's proxy set is unlabeled, a generator's class is only sampled), so
    this marks how much any weighting could gain; it comes from no paper. ``fedkd list`` marks
    it through its class attribute ``upper_bound``.

    Parameters
    ----------
    temperature : float (default: 0.1)
        ``T`` (> 0); lower values give the teacher most likely to be right all the weight.
    """

    upper_bound = True

    def __init__(self, temperature: float = 0.1) -> None:
        self.temperature = _positive_temperature(temperature)

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        truth = ctx.truth if ctx.truth is not None else labels
        if truth is None:
            raise ValueError("the oracle weighting needs the true labels of the weighted "
                             "samples (TeacherContext.truth, or labels with the samples)")
        logp = torch.log_softmax(logits.to(torch.float64), dim=2)
        index = truth.to(torch.int64).view(1, -1, 1).expand(logits.shape[0], -1, 1)
        return _softmax_rows(logp.gather(2, index).squeeze(2), self.temperature).to(logits.dtype)


class Sharpened:
    """Any weighting, with its ensemble's targets sharpened by DS-FL's entropy reduction
    (ERA, :func:`fedkd.distill.era`; Itahara et al., IEEE TMC 2021) before distillation.

    Made by :func:`make_weighting` from the reserved ``weighting_params`` key
    ``era_temperature``; the weights are the base weighting's, every other attribute
    (``uses_labels``, ``update``, ``state_dict``, ...) is the base's too. Strategies pass their
    targets through :func:`sharpen_targets`. The teacher diagnostics describe the weighted
    ensemble before sharpening (ERA keeps each row's arg-max, so its accuracy is the same).
    """

    def __init__(self, base: Weighting, era_temperature: float) -> None:
        self.base = base
        self.era_temperature = era_temperature

    def __call__(self, logits: torch.Tensor, ctx: TeacherContext,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.base(logits, ctx, labels)

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not yet set (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)


def sharpen_targets(weighting: Weighting, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The ensemble ``targets`` after the weighting's ERA, if it has one (:class:`Sharpened`).

    Parameters
    ----------
    weighting : Weighting
        The strategy's weighting.
    targets : torch.Tensor
        ``(N, C)`` ensemble targets.
    kind : str
        ``"probs"``: probability rows, sharpened to ``softmax(p / T)``; ``"logits"``: logit
        rows, sharpened as ``log softmax(softmax(z) / T)`` (log-probabilities, whose softmax is
        the ERA target).
    """
    from fedkd.distill import era

    temperature = getattr(weighting, "era_temperature", None)
    if temperature is None:
        return targets
    if kind == "probs":
        return era(targets, temperature)
    return torch.log(era(torch.softmax(targets, dim=-1), temperature))


def make_weighting(name: str = "uniform", params: Mapping[str, Any] | None = None,
                   path: str = "strategy.params.weighting") -> Weighting:
    """Instantiate the weighting registered as ``name`` with its params.

    The reserved param ``era_temperature`` (> 0) composes any weighting with ERA
    (:class:`Sharpened`).
    """
    from fedkd.scenario import check_kwargs

    cls = WEIGHTINGS.get(name, path)
    params = dict(params or {})
    params_path = path.rsplit(".", 1)[0] + ".weighting_params"
    era_temperature = params.pop("era_temperature", None)
    if era_temperature is not None and (isinstance(era_temperature, bool) or not isinstance(
            era_temperature, int | float) or not era_temperature > 0):
        raise ScenarioError(params_path + ".era_temperature", era_temperature,
                            "a number > 0 (ERA's temperature; 0.1 in DS-FL)")
    check_kwargs(cls, params, params_path)
    try:
        weighting = cls(**params)
    except ValueError as exc:
        raise ScenarioError(params_path, params, str(exc)) from None
    return weighting if era_temperature is None else Sharpened(weighting,
                                                               float(era_temperature))


def uses_labels(weighting: Weighting) -> bool:
    """Whether ``weighting`` fits on labeled server data (its ``uses_labels`` attribute)."""
    return bool(getattr(weighting, "uses_labels", False))


def weighting_split(data: DataBundle) -> tuple[TensorSplit | None, bool]:
    """The labeled server split label-using weightings fit on, and whether it is shared with
    early stopping.

    Parameters
    ----------
    data : DataBundle
        A world's splits.

    Returns
    -------
    tuple of (TensorSplit or None, bool)
        ``(data.weight, False)`` when ``data.weight_fraction > 0`` carved a weighting split,
        disjoint from the validation split; else ``(data.val, True)``: the validation split
        that FedDF also early-stops on (None when there is none either).
    """
    if data.weight is not None and len(data.weight) > 0:
        return data.weight, False
    return data.val, True


def per_client(weighting: Weighting) -> bool:
    """Whether ``weighting`` keeps per-client state updated each round from the students'
    own predictions (``stateful``: ``kt_pfl``); only per-client targets can feed it."""
    return bool(getattr(weighting, "stateful", False))


def needs_client_scores(weighting: Weighting) -> bool:
    """Whether ``weighting`` weighs by scores the clients upload (``client_scores``:
    ``certainty``)."""
    return bool(getattr(weighting, "client_scores", False))


def check_supported(weighting: Weighting, name: str, strategy: str, *,
                    per_client_targets: bool = False, client_scores: bool = False,
                    labeled_split: bool = True) -> None:
    """Raise when ``strategy`` cannot feed the weighting registered as ``name``: a
    per-client weighting without per-client targets, one weighing by client-uploaded
    scores where the clients do not see the weighted samples, or a label-using one where
    the teachers never see the labeled server split.

    Raises
    ------
    ScenarioError
        Naming ``strategy.params.weighting``.
    """
    if per_client(weighting) and not per_client_targets:
        raise ScenarioError("strategy.params.weighting", name,
                            f"a weighting {strategy} supports: {name!r} learns per-client "
                            "targets (strategies dml and fedmd)")
    if uses_labels(weighting) and not labeled_split:
        raise ScenarioError("strategy.params.weighting", name,
                            f"a weighting {strategy} supports: {name!r} fits on the teachers' "
                            "predictions on labeled server data, which this ensemble never "
                            "sees (strategies feddf, fedftg, fedmd and dml)")
    if needs_client_scores(weighting) and not client_scores:
        raise ScenarioError("strategy.params.weighting", name,
                            f"a weighting {strategy} supports: {name!r} needs the clients' "
                            "scores on the proxy samples (strategy feddf)")


def update_students(weighting: Weighting, logits: torch.Tensor, ctx: TeacherContext,
                    students: Sequence[int] | None = None) -> None:
    """Update a per-client weighting (:func:`per_client`) once for each student.

    Parameters
    ----------
    weighting : Weighting
        Updated through its ``update(logits, ctx)``; any other weighting is left alone.
    logits : torch.Tensor
        ``(K, N, C)`` every client's logits on the shared samples.
    ctx : TeacherContext
        Their context, with ``cids``.
    students : Sequence[int], optional
        Indices (into K) of the students to update; all K when None.
    """
    if not per_client(weighting) or ctx.cids is None:
        return
    for i in range(logits.shape[0]) if students is None else students:
        weighting.update(logits, dataclasses.replace(  # type: ignore[attr-defined]
            ctx, student=int(ctx.cids[i]), student_logits=logits[i]))


def check_weighting_split(weighting: Weighting, name: str, split: TensorSplit | None,
                          weight_fraction: float) -> None:
    """Raise when a label-using ``weighting`` (registered as ``name``) has no labeled server
    split to fit on (``split``: what :func:`weighting_split` gave).

    Raises
    ------
    ScenarioError
        Naming ``data.weight_fraction``.
    """
    if uses_labels(weighting) and (split is None or len(split) == 0):
        raise ScenarioError("data.weight_fraction", weight_fraction,
                            f"a fraction > 0 (or data.val_fraction > 0): the {name!r} "
                            "weighting fits on labeled server data")


def class_weights(label_counts: torch.Tensor) -> torch.Tensor:
    """``w[y, k] = n_k(y) / n(y)`` (FedGen/FedFTG); a class nobody holds is uniform.

    Parameters
    ----------
    label_counts : torch.Tensor
        ``(K, C)`` label counts of K teachers.

    Returns
    -------
    torch.Tensor
        ``(C, K)`` weights whose rows sum to 1.
    """
    counts = label_counts.to(torch.float64).T
    total = counts.sum(dim=1, keepdim=True)
    k = counts.shape[1]
    return torch.where(total > 0, counts / total.clamp_min(1), torch.full_like(counts, 1 / k))
