"""FedDF: ensemble distillation for robust model fusion in federated learning.

Lin, Kong, Stich, Jaggi, NeurIPS 2020 (reference code: epfml/federated-learning-public-code,
``codes/FedDF-code``).

Clients train and upload weights exactly as in FedAvg (the base ``"train"`` message and
handler). The server, each round:

1. averages the returned weights per architecture group (FedAvg); each group's average is
   that group's *student* initialisation;
2. takes **every** received client model (any architecture) as a teacher and computes the
   teachers' logits once on the unlabeled proxy set (``data.public``), in-process or on Ray
   actors (``server.teacher_actors``);
3. combines them with the scenario's teacher weighting (uniform by default) into ensemble
   targets: ``ensemble="logits"`` averages logits (the README command of the reference code,
   ``avg_logits``), ``"probs"`` averages softmax probabilities at the temperature
   (``avg_probs``);
4. distils each student on seeded proxy batches with Adam (``distill_lr=1e-3``), cosine
   annealing over ``distill_steps`` and gradient-norm clipping at 5 (as the reference code),
   validating on the server validation split (``data.val_fraction``) every
   ``eval_interval`` steps; after ``patience`` evaluations without improving on the best
   distilled student it stops, and the distilled student with the best validation accuracy
   is kept (the reference's ``best_models``).

``keep_best`` (the reference's ``return_best_model_on_val``): when true, the FedAvg
initialisation is a candidate too and is kept when its validation accuracy is strictly
higher than the best distilled student's, so distillation never lowers the validation
accuracy of the fused model. The reference's default, and the setting of its README
commands, is false (the best *distilled* student is kept even when the FedAvg model
validated better), and so is fedkd's. Early stopping counts from the best distilled student
in both cases, as the reference's tracker does. Without a validation split (``patience: 0``,
``data.val_fraction: 0``) the last student is kept.

Teacher weightings that use labels (``validation``, ``learned``) fit on the weighting split
(``data.weight_fraction > 0``), disjoint from the early-stopping split; with
``data.weight_fraction: 0`` they fit on the validation split itself, and each round records
``weighting-on-val: 1`` (see :func:`strategies.weighting.weighting_split`).

Outside fedkd's engine, in a plain Flower app, FedDF is constructed with what ``bind(world)``
would otherwise fill: the proxy inputs (``proxy``), an optional labeled validation split
(``validation``) and a model builder (``model_fn``); see ``examples/flower_app/``.

Loss conventions (pinned in ``tests/test_feddf.py``):

- direction: forward ``KL(teacher ‖ student)`` (``F.kl_div(log_softmax(student/T),
  teacher_probs)``), as the reference's ``divergence``;
- reduction: ``batchmean`` (the per-sample mean of the KL, as the reference);
- temperature: ``T = 1`` by default (the reference's default); :func:`fedkd.distill.kd_kl`
  multiplies by ``T²`` (Hinton et al.), which the reference does not; the two agree at the
  default ``T = 1`` and differ only by a constant factor (absorbed by Adam) otherwise;
- ``ensemble="probs"`` averages ``softmax(logits/T)`` (the reference softens at ``T = 1``
  only; using ``T`` keeps both ensembles on the same temperature);
- detaching: the ensemble targets are computed without gradient (teachers in eval mode,
  ``torch.no_grad``) and detached inside the loss; only the student is trained, in train
  mode (BatchNorm statistics adapt to the proxy data, as in the reference).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord
from torch import nn

from fedkd.client import seed_for
from fedkd.comm import arrayrecord_to_state_dict, state_dict_to_arrayrecord
from fedkd.data.base import TensorSplit
from fedkd.distill import kd_kl, kd_kl_probs, weighted_logits, weighted_probs
from fedkd.ensemble import ModelSpace, Teacher, TeacherEnsemble
from fedkd.errors import ScenarioError
from fedkd.train import batch_indices, device_of, evaluate, fit
from fedkd.world import World
from strategies import STRATEGIES
from strategies.certainty import CERTAINTY_TRAIN, uploaded_scores
from strategies.fedavg import FedAvg, num_examples
from strategies.weighting import (
    TeacherContext,
    check_supported,
    check_weighting_split,
    make_weighting,
    needs_client_scores,
    sharpen_targets,
    uses_labels,
    weighting_split,
)

ENSEMBLES = ("logits", "probs")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------- pure parts
def ensemble_targets(logits: torch.Tensor, weights: torch.Tensor, ensemble: str = "logits",
                     temperature: float = 1.0) -> torch.Tensor:
    """Distillation targets of a teacher ensemble.

    Parameters
    ----------
    logits : torch.Tensor
        ``(K, N, C)`` teacher logits.
    weights : torch.Tensor
        ``(N, K)`` per-sample teacher weights (rows sum to 1).
    ensemble : str
        ``"logits"``: weighted mean of logits; ``"probs"``: weighted mean of
        ``softmax(logits / T)``.
    temperature : float
        ``T`` (used by ``"probs"`` only; ``"logits"`` targets are softened in the loss).

    Returns
    -------
    torch.Tensor
        ``(N, C)`` logits or probabilities.
    """
    if ensemble == "logits":
        return weighted_logits(logits, weights)
    if ensemble == "probs":
        return weighted_probs(logits, weights, temperature)
    raise ScenarioError("strategy.params.ensemble", ensemble, " | ".join(ENSEMBLES))


def distill_loss(ensemble: str, temperature: float) -> LossFn:
    """``loss(student_logits, targets)`` for targets made by :func:`ensemble_targets`."""
    if ensemble == "logits":
        return lambda s, t: kd_kl(s, t, temperature)
    if ensemble == "probs":
        return lambda s, t: kd_kl_probs(s, t, temperature)
    raise ScenarioError("strategy.params.ensemble", ensemble, " | ".join(ENSEMBLES))


@dataclass(frozen=True)
class ModelFnSpace:
    """Builds every model from one function: the single architecture of a plain Flower app."""

    model_fn: Callable[[], nn.Module]

    def build(self, arch: str, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A model from ``model_fn``, loaded with ``state`` when given, in eval mode."""
        model = self.model_fn()
        if state is not None:
            model.load_state_dict(state)
        return model.eval()


@dataclass(frozen=True)
class ServerData:
    """What server-side distillation needs, from a fedkd world or a plain app's arguments.

    Attributes
    ----------
    proxy : TensorSplit
        Unlabeled proxy inputs (labels used only when ``proxy_labeled``).
    val : TensorSplit or None
        Labeled validation split for early stopping.
    space : ModelSpace or ModelFnSpace
        Builds each architecture's model.
    share : Counter[str]
        Clients per architecture (weights the per-group statistics); empty: equal weights.
    proxy_labeled : bool
        Whether strategies may read ``proxy.y``.
    proxy_truth : bool
        Whether ``proxy.y`` are the true labels (for the diagnostics and ``oracle`` only).
    teacher_actors, eval_batch_size : int
        Ray actors for the teachers' logits (0: in-process) and their inference batch size.
    fit : TensorSplit or None
        Labeled split label-using weightings fit on (None: ``val``).
    fit_shared : bool
        Whether that split is the early-stopping split ``val``.
    """

    proxy: TensorSplit
    val: TensorSplit | None
    space: ModelSpace | ModelFnSpace
    share: Counter[str]
    proxy_labeled: bool = False
    proxy_truth: bool = False
    teacher_actors: int = 0
    eval_batch_size: int = 1024
    fit: TensorSplit | None = None
    fit_shared: bool = True

    @property
    def weighting_data(self) -> TensorSplit | None:
        """The labeled split label-using weightings fit on."""
        return self.val if self.fit is None else self.fit

    @classmethod
    def of_world(cls, world: World) -> ServerData:
        """The server-side view of a fedkd world."""
        assert world.data.public is not None
        fit, shared = weighting_split(world.data)
        return cls(proxy=world.data.public, val=world.data.val, space=world.model_space(),
                   share=Counter(world.archs), proxy_labeled=world.data.public_labeled,
                   proxy_truth=world.data.public_truth,
                   teacher_actors=world.scenario.server.teacher_actors,
                   eval_batch_size=world.scenario.server.eval_batch_size,
                   fit=fit, fit_shared=shared)

    @classmethod
    def of_arrays(cls, proxy: Any, validation: tuple[Any, Any] | None,
                  model_fn: Callable[[], nn.Module]) -> ServerData:
        """From a plain Flower app's arrays (NumPy or torch) and model builder."""
        x = torch.as_tensor(proxy, dtype=torch.float32)
        val = None
        if validation is not None:
            vx, vy = validation
            val = TensorSplit(torch.as_tensor(vx, dtype=torch.float32),
                              torch.as_tensor(vy, dtype=torch.int64))
        return cls(proxy=TensorSplit(x, torch.zeros(len(x), dtype=torch.int64)), val=val,
                   space=ModelFnSpace(model_fn), share=Counter())


class ClippedAdam(torch.optim.Adam):
    """Adam that clips the global gradient norm before each step (0 disables clipping)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, max_norm: float) -> None:
        super().__init__(params, lr=lr)
        self.max_norm = max_norm

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Clip, then take an Adam step."""
        if self.max_norm > 0:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return super().step(closure)


@dataclass(frozen=True)
class DistillResult:
    """Outcome of distilling one student.

    Attributes
    ----------
    state : dict[str, torch.Tensor]
        The kept student (best validation accuracy; the last one without validation).
    steps : int
        Optimisation steps run (before early stopping).
    best_step : int
        Step of the kept student (0: the initialisation).
    val_before, val_after : float
        Validation accuracy of the initialisation and of the kept student (nan without
        validation data).
    fallback : bool
        Whether ``keep_best`` kept the initialisation because it validated strictly better
        than every distilled student.
    """

    state: dict[str, torch.Tensor]
    steps: int
    best_step: int
    val_before: float
    val_after: float
    fallback: bool = False


def _val_acc(model: nn.Module, val: TensorSplit | None) -> float:
    return float("nan") if val is None else evaluate(model, val.x, val.y)[1]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state (the model may live on a GPU)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def distill(student: nn.Module, x: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn, *,
            steps: int, batch_size: int, lr: float, seed: int, val: TensorSplit | None,
            eval_interval: int, patience: int, max_grad_norm: float = 5.0,
            keep_best: bool = False) -> DistillResult:
    """Distil ``targets`` on ``x`` into ``student`` with Adam, cosine annealing, early stopping.

    Parameters
    ----------
    student : nn.Module
        Trained in place, then loaded with the kept state.
    x, targets : torch.Tensor
        Proxy inputs and their ensemble targets (row-aligned).
    loss_fn : Callable
        ``loss_fn(student_logits, targets[idx])``.
    steps, batch_size, lr : int, int, float
        Step budget (also the cosine period), proxy batch size, initial Adam learning rate.
    seed : int
        Seeds the batch order.
    val : TensorSplit, optional
        Validation split: evaluated before training and every ``eval_interval`` steps (and
        after the last step); the best distilled student (ties keep the earlier one) is kept.
        Without it, the last student is.
    eval_interval, patience : int
        Steps between evaluations; evaluations without improving on the best distilled
        student before stopping (0: never stop early).
    max_grad_norm : float
        Gradient-norm clipping (0 disables).
    keep_best : bool
        Also keep the initialisation as a candidate: it is returned when its validation
        accuracy is strictly higher than the best distilled student's.
    """
    val_before = _val_acc(student, val)
    init_state = _snapshot(student)
    if steps <= 0 or len(x) == 0:
        return DistillResult(init_state, 0, 0, val_before, val_before)
    optimizer = ClippedAdam(student.parameters(), lr=lr, max_norm=max_grad_norm)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    batches: Iterator[torch.Tensor] = batch_indices(
        len(x), batch_size, torch.Generator().manual_seed(seed), steps=steps)
    interval = eval_interval if val is not None else steps

    dev = device_of(student)

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        return loss_fn(student(x[idx].to(dev)), targets[idx].to(dev))

    best: tuple[float, dict[str, torch.Tensor], int] | None = None  # acc, state, step
    done = bad = 0
    while done < steps:
        ran = fit(student, optimizer, islice(batches, min(interval, steps - done)), step_loss,
                  scheduler).steps
        if ran == 0:
            break
        done += ran
        if val is None:
            continue
        acc = _val_acc(student, val)
        if best is None or acc > best[0]:
            best, bad = (acc, _snapshot(student), done), 0
        else:
            bad += 1
            if 0 < patience <= bad:
                break
    if val is None or best is None:  # no validation (or no step ran): the last student
        best = (_val_acc(student, val), _snapshot(student), done)
    fallback = keep_best and val_before > best[0]
    acc, state, step = (val_before, init_state, 0) if fallback else best
    student.load_state_dict(state)
    return DistillResult(state, done, step, val_before, acc, fallback)


# ---------------------------------------------------------------------------------- strategy
@STRATEGIES.register("feddf")
class FedDF(FedAvg):
    """FedAvg per architecture, then ensemble distillation of all client models on proxy data.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As :class:`strategies.fedavg.FedAvg`.
    ensemble : str
        ``"logits"`` (average logits, FedDF's default) or ``"probs"`` (average softmax).
    temperature : float
        Distillation temperature ``T``.
    distill_steps : int
        Server distillation steps per group and round (also the cosine-annealing period).
    distill_batch_size : int
        Proxy samples per distillation step.
    distill_lr : float
        Adam's initial learning rate.
    eval_interval : int
        Steps between validation evaluations.
    patience : int
        Evaluations without improvement before stopping (0: no early stopping; then the
        validation split is optional).
    keep_best : bool
        Keep the FedAvg model of a group when it validates strictly better than every
        distilled student (the reference's ``return_best_model_on_val``; its default and
        fedkd's: false, the best distilled student is kept).
    max_grad_norm : float
        Gradient-norm clipping of the student (reference: 5; 0 disables).
    weighting : str
        Teacher weighting (``strategies/weighting.py``); label-using ones fit on the
        weighting split (``data.weight_fraction``), else on the validation split.
    weighting_params : dict, optional
        Its parameters.
    proxy : array-like, optional
        Proxy inputs ``(N, ...)``, for use outside fedkd's engine (``bind`` fills them).
    validation : tuple of array-like, optional
        ``(x, y)`` labeled validation split, likewise (needed when ``patience > 0``).
    model_fn : Callable[[], nn.Module], optional
        Builds the (single) model architecture, likewise.
    """

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 ensemble: str = "logits", temperature: float = 1.0, distill_steps: int = 200,
                 distill_batch_size: int = 64, distill_lr: float = 1e-3,
                 eval_interval: int = 20, patience: int = 3, max_grad_norm: float = 5.0,
                 keep_best: bool = False, weighting: str = "uniform",
                 weighting_params: dict[str, Any] | None = None, proxy: Any = None,
                 validation: tuple[Any, Any] | None = None,
                 model_fn: Callable[[], nn.Module] | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        _check_params(ensemble=ensemble, temperature=temperature, distill_steps=distill_steps,
                      distill_batch_size=distill_batch_size, distill_lr=distill_lr,
                      eval_interval=eval_interval, patience=patience,
                      max_grad_norm=max_grad_norm, keep_best=keep_best)
        self.ensemble = ensemble
        self.temperature = temperature
        self.distill_steps = distill_steps
        self.distill_batch_size = distill_batch_size
        self.distill_lr = distill_lr
        self.eval_interval = eval_interval
        self.patience = patience
        self.max_grad_norm = max_grad_norm
        self.keep_best = keep_best
        self.weighting = weighting
        self.weighting_params = dict(weighting_params or {})
        self.weigh = make_weighting(weighting, self.weighting_params)
        self.distill_log: dict[int, dict[str, float]] = {}
        self.server: ServerData | None = None
        if proxy is not None or model_fn is not None:
            if proxy is None or model_fn is None:
                raise ValueError("FedDF outside fedkd's engine needs both proxy and model_fn")
            if patience > 0 and validation is None:
                raise ValueError("FedDF early-stops on validation=(x, y); give it or patience=0")
            if uses_labels(self.weigh) and validation is None:
                raise ValueError(f"the {weighting!r} weighting fits on validation=(x, y)")
            self.server = ServerData.of_arrays(proxy, validation, model_fn)

    def bind(self, world: World) -> None:
        """Bind the world; FedDF needs a proxy split (and a validation split to early-stop)."""
        d = world.scenario.data
        if world.data.public is None or len(world.data.public) == 0:
            raise ScenarioError("data.public.fraction", d.public.fraction,
                                "a fraction > 0 (or data.public.dataset): FedDF distils on "
                                "an unlabeled proxy split")
        if self.patience > 0 and (world.data.val is None or len(world.data.val) == 0):
            raise ScenarioError("data.val_fraction", d.val_fraction,
                                "a fraction > 0: FedDF early-stops on the server validation "
                                "split (or set strategy.params.patience: 0)")
        server = ServerData.of_world(world)
        check_weighting_split(self.weigh, self.weighting, server.weighting_data,
                              d.weight_fraction)
        check_supported(self.weigh, self.weighting, "feddf", client_scores=True)
        super().bind(world)
        self.server = server

    @property
    def train_type(self) -> str:  # type: ignore[override]
        """FedAvg's train message, or the one that also uploads certainty scores (FedAUX)."""
        return CERTAINTY_TRAIN if needs_client_scores(self.weigh) else MessageType.TRAIN

    # -------------------------------------------------------------------------- aggregation
    def fuse(self, server_round: int, replies: Sequence[Message],
             groups: dict[str, ArrayRecord], metrics: MetricRecord) -> dict[str, ArrayRecord]:
        """Distil the ensemble of all client models into each group's FedAvg model."""
        targets = self.proxy_targets(server_round, replies)
        fused, stats = self.distill_groups(server_round, groups, targets)
        if uses_labels(self.weigh):
            stats["weighting-on-val"] = float(self._server().fit_shared)
        for key, value in stats.items():
            metrics[key] = value
        self.distill_log[server_round] = stats
        return fused

    def teachers(self, replies: Sequence[Message]) -> TeacherEnsemble:
        """Every replying client's model as a teacher, in reply order."""
        server = self._server()
        teachers = [Teacher(cid=self.node(r.metadata.src_node_id).cid,
                            arch=self.node(r.metadata.src_node_id).arch,
                            state=arrayrecord_to_state_dict(r.content.array_records["arrays"]))
                    for r in replies]
        return TeacherEnsemble(server.space, teachers, actors=server.teacher_actors,
                               batch_size=server.eval_batch_size)

    def proxy_targets(self, server_round: int, replies: Sequence[Message]) -> torch.Tensor:
        """Ensemble targets on the proxy set (one teacher pass per round); records weights.

        The teachers' logits on the weighting split (:attr:`ServerData.weighting_data`: the
        separate ``data.weight_fraction`` split, else the validation split) come from the
        same pass and reach the weighting as ``TeacherContext.val_logits``/``val_labels``.
        """
        server = self._server()
        public, val = server.proxy, server.weighting_data
        x = public.x if val is None else torch.cat([public.x, val.x])
        all_logits = self.teachers(replies).logits(x)
        logits = all_logits[:, :len(public)]
        counts = [self.node(r.metadata.src_node_id).label_counts for r in replies]
        ctx = TeacherContext(
            num_examples=torch.tensor([num_examples(r, self.weighted_by_key) for r in replies],
                                      dtype=torch.float64),
            # a plain Flower app reports no label counts: every class counts zero
            label_counts=(torch.tensor(counts, dtype=torch.float64) if all(counts) else
                          torch.zeros(len(replies), logits.shape[-1], dtype=torch.float64)),
            val_logits=None if val is None else all_logits[:, len(public):],
            val_labels=None if val is None else val.y,
            cids=torch.tensor([self.node(r.metadata.src_node_id).cid for r in replies]),
            certainty=uploaded_scores(replies) if needs_client_scores(self.weigh) else None)
        labels = public.y if server.proxy_labeled else None
        truth = public.y if server.proxy_truth else None
        weights = self.weigh(logits, replace(ctx, truth=truth), labels)
        cids = [self.node(r.metadata.src_node_id).cid for r in replies]
        self.teacher_log.record(server_round, cids, logits, weights, truth,
                                ensemble=self.ensemble)
        # scores uploaded for the proxy samples only: no weights on the validation split
        proxy_only = needs_client_scores(self.weigh)
        if self.teacher_log.enabled and server.val is not None and not proxy_only:
            self.diagnose_val(server_round, replies, ctx, all_logits[:, len(public):]
                              if val is server.val else None)
        targets = ensemble_targets(logits, weights, self.ensemble, self.temperature)
        return sharpen_targets(self.weigh, targets, self.ensemble)

    def diagnose_val(self, server_round: int, replies: Sequence[Message], ctx: TeacherContext,
                     val_logits: torch.Tensor | None) -> None:
        """Diagnose the weighted ensemble on the validation split (teachers' logits on it:
        ``val_logits`` when the weighting pass has them, else one more pass)."""
        val = self._server().val
        assert val is not None
        if val_logits is None:
            val_logits = self.teachers(replies).logits(val.x)
        weights = self.weigh(val_logits, replace(ctx, truth=val.y), None)
        self.teacher_log.record(server_round, ctx.cids.tolist() if ctx.cids is not None else [],
                                val_logits, weights, val.y, ensemble=self.ensemble,
                                source="val", per_class=False)

    def distill_groups(self, server_round: int, groups: dict[str, ArrayRecord],
                       targets: torch.Tensor) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        """Distil ``targets`` into each group's FedAvg model; returns models and round stats."""
        server = self._server()
        space, public = server.space, server.proxy
        loss_fn = distill_loss(self.ensemble, self.temperature)
        fused: dict[str, ArrayRecord] = {}
        results: dict[str, DistillResult] = {}
        for i, (arch, rec) in enumerate(groups.items()):
            student = space.build(arch, arrayrecord_to_state_dict(rec))
            results[arch] = distill(
                student, public.x, targets, loss_fn, steps=self.distill_steps,
                batch_size=self.distill_batch_size, lr=self.distill_lr,
                seed=seed_for(self.seed, server_round, i, 101), val=server.val,
                eval_interval=self.eval_interval, patience=self.patience,
                max_grad_norm=self.max_grad_norm, keep_best=self.keep_best)
            fused[arch] = state_dict_to_arrayrecord(results[arch].state)
        return fused, round_stats(results, server.share or Counter(list(results)))

    def _server(self) -> ServerData:
        if self.server is None:
            raise RuntimeError("FedDF needs proxy data: call bind(world) or pass proxy, "
                               "validation and model_fn")
        return self.server


def round_stats(results: dict[str, DistillResult], share: Counter[str]) -> dict[str, float]:
    """Round metrics: steps summed over groups, validation accuracies averaged by client share,
    and ``distill-fallback``, the groups that kept their FedAvg model (``keep_best``).

    Per-group values (``<key>/<arch>``) are added when there is more than one group.
    """
    total = sum(share[a] for a in results) or 1
    stats: dict[str, float] = {
        "distill-steps": sum(r.steps for r in results.values()),
        "distill-fallback": sum(r.fallback for r in results.values()),
        "val-acc-avg": sum(r.val_before * share[a] for a, r in results.items()) / total,
        "val-acc-distilled": sum(r.val_after * share[a] for a, r in results.items()) / total,
    }
    if len(results) > 1:
        for arch, r in results.items():
            stats.update({f"distill-steps/{arch}": r.steps, f"val-acc-avg/{arch}": r.val_before,
                          f"val-acc-distilled/{arch}": r.val_after})
    return stats


def _check_params(**p: Any) -> None:
    """Reject out-of-range constructor values with the YAML key path."""
    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "ensemble": (lambda v: v in ENSEMBLES, " | ".join(ENSEMBLES)),
        "temperature": (lambda v: v > 0, "a number > 0"),
        "distill_steps": (lambda v: v >= 0, "an integer >= 0"),
        "distill_batch_size": (lambda v: v > 0, "an integer > 0"),
        "distill_lr": (lambda v: v > 0, "a number > 0"),
        "eval_interval": (lambda v: v > 0, "an integer > 0"),
        "patience": (lambda v: v >= 0, "an integer >= 0"),
        "max_grad_norm": (lambda v: v >= 0, "a number >= 0"),
        "keep_best": (lambda v: isinstance(v, bool), "true or false"),
    }
    for name, (ok, allowed) in rules.items():
        if not ok(p[name]):
            raise ScenarioError(f"strategy.params.{name}", p[name], allowed)
