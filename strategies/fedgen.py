"""FedGen: data-free knowledge distillation with a server-side latent generator.

Zhu, Hong, Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021 (reference code: github.com/zhuangdizhu/FedGen, ``serverpFedGen.py``,
``userpFedGen.py``, ``generator.py``, ``utils/model_config.py``).

Each round the server averages the clients' weights (FedAvg per architecture group) and then
trains a small conditional generator ``G(y, eps) -> z`` of *latent features* (the input of
every model's linear ``head``) so that the ensemble of the received clients' heads classifies
``z`` as ``y`` (``generator_steps`` Adam steps on batches of ``generator_batch_size`` labels;
the generator, its losses and their conventions are in :mod:`fedkd.feature_generator`). The
generator persists across rounds and is broadcast with the global model; clients use it as an
inductive bias during local training, adding to ``CE(model(x), y)`` per batch::

    (gen_batch_size / batch_size) * alpha_t * CE(head(G(y_hat)), y_hat)
    + beta_t * KL(softmax(head(G(y))).detach() ‖ softmax(model(x)))

with ``alpha_t = max(1e-4, generative_alpha * 0.98**t)`` (same for ``beta_t``; the code's
``exp_lr_scheduler``), ``t`` the 0-based round index, ``y`` the real batch labels and ``y_hat``
``gen_batch_size`` labels drawn uniformly from the labels the generator was trained on.

Label counts and teacher weights ``w[y, k] = n_k(y) / n(y)``
(:func:`strategies.weighting.class_weights`; the ``weighting`` plug when ``label_weighting``
is false):

- ``label_counts: drawn`` (the code's): each client counts the labels of the batches it draws
  in the round's local training, starting at 1 for every class (``clean_up_counts``,
  ``update_label_counts``), and reports them in its train reply (metric ``label-counts``); the
  server weighs the round's teachers with them and draws generator labels from those some
  client drew at least once (a count above 1, the code's ``MIN_SAMPLES_PER_LABEL``).
- ``label_counts: dataset``: the handshake's dataset label counts; generator labels are those
  with a positive count.

Presets (``preset``; any parameter given explicitly overrides its preset value):

=====================================  =========================  ===========================
parameter                              ``stable`` (default)       ``paper``
=====================================  =========================  ===========================
``generative_alpha``, ``_beta``        1, 1                       10, 10 (MNIST RUNCONFIGS)
``client_lr``                          scenario's                 0.01 (``--learning_rate``)
``client_momentum``, ``_weight_decay`` scenario's                 0, 0 (``pFedIBOptimizer``)
``client_lr_decay``                    1 (none)                   0.99 (``ExponentialLR``)
``label_counts``                       ``dataset``                ``drawn``
=====================================  =========================  ===========================

The reference's client optimizer is plain SGD (``p -= lr * grad``) whose
``ExponentialLR(gamma=0.99)`` is stepped as ``step(glob_iter)`` after each local training, so
0-based round ``t`` trains at ``lr * 0.99**max(t - 1, 0)``; in fedkd's 1-based rounds
``lr_r = client_lr * client_lr_decay**max(r - 2, 0)`` (:func:`client_lr`). ``stable`` keeps
the results measured before presets existed; it is the default because the paper preset
swaps the local optimizer of the scenario (the one every other strategy uses) for FedGen's
own, which makes FedGen-vs-FedAvg comparisons compare optimizers too. With the scenario's
SGD (momentum 0.9, lr 0.05) coefficients of 10 made local training diverge on digits
(accuracy 0.10 from round 2), hence 1 in ``stable``. Quickstart (digits, 10 clients, 10
rounds), test accuracy after round 10: ``stable`` 0.956 (FedAvg 0.914), ``paper`` 0.761
(FedAvg with the same plain SGD at lr 0.01: 0.467): the paper's regulariser helps most under
its own, slower optimizer.

Where fedkd differs from the code:

- The client learning-rate decay follows the global round; the code's scheduler lives in each
  client and is stepped only when it trains, so under partial participation its decay lags
  (the two agree under full participation).
- The code trains ``local_epochs = 20`` batches per round (``K = 1`` batch per "epoch"); both
  presets keep the scenario's ``epochs``/``steps`` (``clients.train.steps: 20`` for the code's).
  Drawn counts include a last partial batch (the code's loader drops it).
- The student of the adversarial term is the freshly aggregated global head (the code uses
  the previous round's); the term is off by default (``ensemble_beta = 0``, as in the code).
- Clients sample ``y_hat`` from the labels the generator was trained on (the code's
  ``available_labels``: every label in the federation).
- The generator is not sent before it has been trained once (round 1 has no regulariser), so
  from round 2 on each client downloads the generator's arrays in addition to the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from fedkd.client import ClientEnv, client_fn, seed_for
from fedkd.comm import state_dict_to_arrayrecord
from fedkd.diagnostics import Batches
from fedkd.errors import ScenarioError
from fedkd.feature_generator import (
    Generator,
    Heads,
    build_generator,
    client_regulariser,
    generator_loss,
    load_generator,
)
from fedkd.models import one_latent_dim
from fedkd.scenario import TrainConfig
from fedkd.train import device_of, train_supervised
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import FedAvg, NodeInfo
from strategies.weighting import TeacherContext, check_supported, class_weights, make_weighting

TRAIN_TYPE = f"{MessageType.TRAIN}.fedgen"
DECAY = 0.98
MIN_COEF = 1e-4
#: A drawn label count (which starts at 1) above this means the label was drawn.
MIN_SAMPLES_PER_LABEL = 1


def decayed(value: float, t: int, decay: float = DECAY, floor: float = MIN_COEF) -> float:
    """``max(floor, value * decay**t)``: FedGen's client coefficients ``alpha_t``, ``beta_t``."""
    return max(floor, value * decay ** t)


def client_lr(lr: float, decay: float, server_round: int) -> float:
    """``lr * decay**max(server_round - 2, 0)``: the code's client lr in a (1-based) round."""
    return lr * decay ** max(server_round - 2, 0)


# ---------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class ClientParams:
    """FedGen's client-side hyper-parameters (a preset, then explicit overrides).

    ``None`` for ``client_lr``, ``client_momentum`` or ``client_weight_decay`` keeps the
    scenario's ``clients.train`` value.
    """

    generative_alpha: float
    generative_beta: float
    client_lr: float | None = None
    client_momentum: float | None = None
    client_weight_decay: float | None = None
    client_lr_decay: float = 1.0
    label_counts: str = "dataset"

    def __post_init__(self) -> None:
        checks: list[tuple[str, Any, bool, str]] = [
            ("generative_alpha", self.generative_alpha, self.generative_alpha >= 0,
             "a number >= 0"),
            ("generative_beta", self.generative_beta, self.generative_beta >= 0,
             "a number >= 0"),
            ("client_lr", self.client_lr, self.client_lr is None or self.client_lr > 0,
             "a number > 0"),
            ("client_momentum", self.client_momentum,
             self.client_momentum is None or 0 <= self.client_momentum < 1, "a number in [0, 1)"),
            ("client_weight_decay", self.client_weight_decay,
             self.client_weight_decay is None or self.client_weight_decay >= 0, "a number >= 0"),
            ("client_lr_decay", self.client_lr_decay, 0 < self.client_lr_decay <= 1,
             "a number in (0, 1]"),
            ("label_counts", self.label_counts, self.label_counts in ("dataset", "drawn"),
             "'dataset' or 'drawn'")]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ScenarioError(f"strategy.params.{name}", value, allowed)

    def optimizer_config(self) -> dict[str, float]:
        """The train-config entries this replaces (``lr``, ``momentum``, ``weight-decay``)."""
        pairs = (("lr", self.client_lr), ("momentum", self.client_momentum),
                 ("weight-decay", self.client_weight_decay))
        return {key: float(v) for key, v in pairs if v is not None}


PRESETS: dict[str, ClientParams] = {
    "stable": ClientParams(generative_alpha=1.0, generative_beta=1.0),
    "paper": ClientParams(generative_alpha=10.0, generative_beta=10.0, client_lr=0.01,
                          client_momentum=0.0, client_weight_decay=0.0, client_lr_decay=0.99,
                          label_counts="drawn"),
}


def resolve_preset(preset: str, **overrides: Any) -> ClientParams:
    """The preset's :class:`ClientParams` with the non-``None`` overrides applied.

    Raises
    ------
    ScenarioError
        For an unknown preset or an out-of-range value (naming its YAML key).
    """
    if preset not in PRESETS:
        raise ScenarioError("strategy.params.preset", preset, f"one of {sorted(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[preset], **given)


# ---------------------------------------------------------------------------------- server
def check_latent_dims(dims: dict[str, int]) -> int:
    """The one latent width of all architecture groups (:func:`fedkd.models.one_latent_dim`)."""
    return one_latent_dim(dims, "FedGen's generator produces features for every client's head")


def label_pool(label_counts: torch.Tensor, floor: float = 0) -> torch.Tensor:
    """Labels some teacher counts more than ``floor`` of (``max_k n_k(y) > floor``)."""
    return torch.nonzero(label_counts.max(0).values > floor).flatten()


def reply_label_counts(replies: Sequence[Message]) -> torch.Tensor:
    """``(K, C)`` label counts the replies report (metric ``label-counts``)."""
    return torch.tensor([list(r.content.metric_records["metrics"]["label-counts"])
                         for r in replies], dtype=torch.float64)


@STRATEGIES.register("fedgen")
class FedGen(FedAvg):
    """FedAvg plus a server-trained latent generator that regularises local training.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As in :class:`strategies.fedavg.FedAvg`.
    preset : str
        ``"stable"`` (default) or ``"paper"``: the client-side values below that are not
        given (see the module docstring's table).
    generative_alpha, generative_beta : float, optional
        Initial client coefficients of the generated-sample CE and the latent KL (decay 0.98
        per round).
    client_lr, client_momentum, client_weight_decay : float, optional
        Local SGD settings replacing the scenario's ``clients.train`` ones.
    client_lr_decay : float, optional
        Per-round factor of the local learning rate (:func:`client_lr`; 1 = constant).
    label_counts : str, optional
        ``"drawn"`` (counted in local training, reported per round) or ``"dataset"`` (the
        handshake's): the counts behind the teacher weights and the generator's labels.
    gen_batch_size : int
        Labels sampled per local batch for the generated-sample CE.
    noise_dim, hidden_dim : int
        Generator noise and hidden widths.
    generator_lr, generator_weight_decay, generator_lr_decay : float
        Adam learning rate, weight decay and per-round learning-rate decay of the generator.
    generator_steps, generator_batch_size : int
        Generator updates per round and labels per update.
    ensemble_alpha, ensemble_beta, ensemble_eta : float
        Weights of the teacher CE, adversarial student KL and diversity terms.
    label_weighting : bool
        Weight teachers by ``n_k(y) / n(y)`` (FedGen); when false use ``weighting``.
    weighting, weighting_params
        Teacher-weighting plug (``strategies.weighting``) used when ``label_weighting`` is
        false.
    """

    train_type = TRAIN_TYPE

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 preset: Literal["stable", "paper"] = "stable",
                 generative_alpha: float | None = None, generative_beta: float | None = None,
                 client_lr: float | None = None, client_momentum: float | None = None,
                 client_weight_decay: float | None = None,
                 client_lr_decay: float | None = None,
                 label_counts: Literal["dataset", "drawn"] | None = None,
                 gen_batch_size: int = 32, noise_dim: int = 32, hidden_dim: int = 256,
                 generator_lr: float = 3e-4, generator_weight_decay: float = 1e-2,
                 generator_lr_decay: float = 0.98, generator_steps: int = 50,
                 generator_batch_size: int = 32, ensemble_alpha: float = 1.0,
                 ensemble_beta: float = 0.0, ensemble_eta: float = 1.0,
                 label_weighting: bool = True, weighting: str = "uniform",
                 weighting_params: dict[str, Any] | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        self.preset = preset
        self.params = resolve_preset(
            preset, generative_alpha=generative_alpha, generative_beta=generative_beta,
            client_lr=client_lr, client_momentum=client_momentum,
            client_weight_decay=client_weight_decay, client_lr_decay=client_lr_decay,
            label_counts=label_counts)
        self.gen_batch_size = gen_batch_size
        self.noise_dim = noise_dim
        self.hidden_dim = hidden_dim
        self.generator_lr = generator_lr
        self.generator_weight_decay = generator_weight_decay
        self.generator_lr_decay = generator_lr_decay
        self.generator_steps = generator_steps
        self.generator_batch_size = generator_batch_size
        self.ensemble_alpha = ensemble_alpha
        self.ensemble_beta = ensemble_beta
        self.ensemble_eta = ensemble_eta
        self.label_weighting = label_weighting
        self.weighting = weighting
        self.weighting_params = dict(weighting_params or {})
        self.weigh = make_weighting(weighting, self.weighting_params)
        self.generator: Generator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.generator_record: ArrayRecord | None = None
        self.generator_labels: list[int] = []
        self.generator_losses: dict[int, dict[str, float]] = {}

    def bind(self, world: World) -> None:
        """Check that every architecture shares one latent width and build the generator."""
        check_supported(self.weigh, self.weighting, "fedgen",
                        labeled_split=self.label_weighting)
        super().bind(world)
        dims = {arch: int(world.new_model(arch, seed=0).latent_dim) for arch in world.groups}
        self.ensure_generator(world.data.num_classes, check_latent_dims(dims))

    def ensure_generator(self, num_classes: int, latent_dim: int) -> Generator:
        """The persistent generator with its Adam optimizer (built on first use, seeded)."""
        if self.generator is None:
            self.generator = build_generator(num_classes, latent_dim, self.noise_dim,
                                             self.hidden_dim, seed=seed_for(self.seed, 4242))
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr,
                                              weight_decay=self.generator_weight_decay)
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
                self.optimizer, gamma=self.generator_lr_decay)
        return self.generator

    # ------------------------------------------------------------------ messages
    def client_config(self, server_round: int) -> dict[str, Any]:
        """FedGen's client-side hyper-parameters, sent with every train message."""
        p = self.params
        cfg: dict[str, Any] = {
            "fedgen-alpha": p.generative_alpha, "fedgen-beta": p.generative_beta,
            "gen-batch-size": self.gen_batch_size, "noise-dim": self.noise_dim,
            "hidden-dim": self.hidden_dim, "gen-labels": list(self.generator_labels),
            **p.optimizer_config()}
        if p.client_lr_decay != 1.0:
            cfg["fedgen-lr-decay"] = p.client_lr_decay
        return cfg

    def extra_records(self, server_round: int, arch: str) -> dict[str, ArrayRecord]:
        """The trained generator as ``"generator"`` (nothing before it is trained)."""
        return {"generator": self.generator_record} if self.generator_record else {}

    # ------------------------------------------------------------------ aggregation
    def fuse(self, server_round: int, replies: Sequence[Message],
             groups: dict[str, ArrayRecord], metrics: MetricRecord) -> dict[str, ArrayRecord]:
        """Train the generator on the received clients' heads; the groups stay FedAvg's."""
        metrics.pop("label-counts", None)  # Flower's mean of the replies' counts
        teachers = Heads.from_records([r.content.array_records["arrays"] for r in replies])
        students = [Heads.from_records([rec]) for rec in groups.values()]
        infos = [self.node(r.metadata.src_node_id) for r in replies]
        drawn = reply_label_counts(replies) if self.params.label_counts == "drawn" else None
        self.train_generator(server_round, teachers, students, infos, drawn)
        return groups

    def teacher_context(self, infos: Sequence[NodeInfo],
                        label_counts: torch.Tensor | None = None) -> TeacherContext:
        """Sizes from the handshake; label counts given (drawn) or the handshake's."""
        if label_counts is None:
            label_counts = torch.tensor([i.label_counts for i in infos], dtype=torch.float64)
        return TeacherContext(
            num_examples=torch.tensor([i.num_examples for i in infos], dtype=torch.float64),
            label_counts=label_counts.to(torch.float64), cids=torch.tensor([i.cid for i in infos]))

    def weights_fn(self, ctx: TeacherContext,
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(logits (K, N, C), y) -> (N, K)`` teacher weights of this round."""
        if self.label_weighting:
            table = class_weights(ctx.label_counts).float()
            return lambda logits, y: table[y]
        return lambda logits, y: self.weigh(logits.detach(), ctx, y).float()

    def train_generator(self, server_round: int, teachers: Heads, students: Sequence[Heads],
                        infos: Sequence[NodeInfo],
                        drawn_counts: torch.Tensor | None = None) -> None:
        """``generator_steps`` Adam steps on FedGen's generator loss; records weights/losses.

        ``drawn_counts`` are the ``(K, C)`` label counts the teachers drew this round (they
        start at 1); without them the handshake's dataset counts are used.
        """
        k, num_classes, latent_dim = teachers.weight.shape
        if len(set(int(t.weight.shape[2]) for t in students)) > 1:
            check_latent_dims({str(i): int(t.weight.shape[2]) for i, t in enumerate(students)})
        gen = self.ensure_generator(num_classes, latent_dim)
        ctx = self.teacher_context(infos, drawn_counts)
        pool = label_pool(ctx.label_counts,
                          MIN_SAMPLES_PER_LABEL if drawn_counts is not None else 0)
        weigh = self.weights_fn(ctx)
        rng = torch.Generator().manual_seed(seed_for(self.seed, server_round, 11))
        sums = {"teacher": 0.0, "diversity": 0.0, "student": 0.0}
        w_total = torch.zeros(k, dtype=torch.float64)
        batches = Batches() if self.teacher_log.enabled else None
        gen.train()
        for _ in range(self.generator_steps):
            y = pool[torch.randint(len(pool), (self.generator_batch_size,), generator=rng)]
            eps = gen.noise(len(y), rng)
            z = gen(y, eps)
            logits = teachers.logits(z)
            w = weigh(logits, y)
            if batches is not None:
                batches.add(logits, w, y)
            loss, parts = generator_loss(z, eps, y, teachers, w, students, self.ensemble_alpha,
                                         self.ensemble_beta, self.ensemble_eta)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            w_total += w.detach().to(torch.float64).sum(0)
            sums = {key: sums[key] + parts[key] for key in sums}
        self.scheduler.step()
        steps = max(self.generator_steps, 1)
        self.generator_losses[server_round] = {key: v / steps for key, v in sums.items()}
        cids = [i.cid for i in infos]
        kept = batches.tensors() if batches is not None else None
        if kept is not None:
            self.teacher_log.record(server_round, cids, *kept, ensemble="logits",
                                    source="generated")
        else:
            self.teacher_log.weights(server_round, cids,
                                     w_total / (steps * self.generator_batch_size), "generated")
        self.generator_labels = [int(c) for c in pool]
        self.generator_record = state_dict_to_arrayrecord(gen.state_dict())


# ---------------------------------------------------------------------------------- client
def fedgen_extra_loss(model: nn.Module, gen: Generator, y: torch.Tensor, labels: torch.Tensor,
                      alpha: float, beta: float, gen_batch_size: int, batch_size: int,
                      rng: torch.Generator) -> Callable[[torch.Tensor, torch.Tensor],
                                                        torch.Tensor]:
    """The ``extra_loss(idx, logits)`` hook of :func:`fedkd.train.train_supervised`.

    The generator runs in eval mode without gradient, on the model's device; only the model's
    head sees the generated features. Random draws use ``rng`` on the CPU.
    """
    dev = device_of(model)
    gen.to(dev).eval()
    ratio = gen_batch_size / batch_size

    def extra(idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        y_gen = labels[torch.randint(len(labels), (gen_batch_size,), generator=rng)].to(dev)
        with torch.no_grad():
            z_real = gen(y[idx].to(dev), gen.noise(len(idx), rng).to(dev))
            z_gen = gen(y_gen, gen.noise(gen_batch_size, rng).to(dev))
        return client_regulariser(logits, model.head, z_real, z_gen, y_gen, alpha, beta, ratio)

    return extra


def counting_labels(extra: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                    y: torch.Tensor, counts: torch.Tensor,
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``extra`` (or a zero term) that first adds the batch's labels ``y[idx]`` to ``counts``.

    ``counts`` (``(C,)`` int64, updated in place) starts at 1 per class as the code's
    ``label_counts``; the zero term leaves the loss and its gradients unchanged.
    """

    def hook(idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        counts.add_(torch.bincount(y[idx].cpu(), minlength=len(counts)))
        return extra(idx, logits) if extra is not None else logits.new_zeros(())

    return hook


def local_train_config(env: ClientEnv) -> TrainConfig:
    """The round's train config with FedGen's learning-rate decay applied."""
    cfg = env.train_config
    decay = float(env.config.get("fedgen-lr-decay", 1.0))
    if decay == 1.0:
        return cfg
    return dataclasses.replace(cfg, lr=client_lr(cfg.lr, decay, env.server_round))


def client_generator(record: ArrayRecord, model: nn.Module, config: ConfigRecord) -> Generator:
    """The received generator, shaped by the model's head and the config's widths."""
    head = model.head
    return load_generator(record, head.out_features, head.in_features,
                          int(config["noise-dim"]), int(config["hidden-dim"]))


@client_fn(TRAIN_TYPE)
def train_fedgen(msg: Message, env: ClientEnv) -> RecordDict:
    """Local training with FedGen's generator regulariser (plain CE before one is trained).

    The reply reports the round's drawn label counts (``label-counts``, starting at 1).
    """
    model = env.model_from(msg.content.array_records["arrays"])
    data, cfg = env.data, local_train_config(env)
    extra = None
    gen_rec = msg.content.array_records.get("generator")
    labels = [int(v) for v in env.config.get("gen-labels", [])]
    if gen_rec is not None and labels:
        t = env.server_round - 1
        extra = fedgen_extra_loss(
            model, client_generator(gen_rec, model, env.config), data.y,
            torch.tensor(labels, dtype=torch.long),
            decayed(float(env.config["fedgen-alpha"]), t),
            decayed(float(env.config["fedgen-beta"]), t),
            int(env.config["gen-batch-size"]), cfg.batch_size,
            torch.Generator().manual_seed(env.seed(3)))
    counts = torch.ones(env.world.data.num_classes, dtype=torch.long)
    result = train_supervised(model, data.x, data.y, cfg, seed=env.seed(),
                              extra_loss=counting_labels(extra, data.y, counts))
    return RecordDict({
        "arrays": state_dict_to_arrayrecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": len(data), "train-loss": result.loss,
                                 "label-counts": [int(c) for c in counts]}),
    })
