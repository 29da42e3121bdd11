"""FedGen: data-free knowledge distillation with a server-side latent generator.

Zhu, Hong, Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021 (reference code: github.com/zhuangdizhu/FedGen, ``serverpFedGen.py``,
``userpFedGen.py``, ``generator.py``).

Each round the server averages the clients' weights (FedAvg per architecture group) and then
trains a small conditional generator ``G(y, eps) -> z`` of *latent features* (the input of
every model's linear ``head``) so that the ensemble of the received clients' heads classifies
``z`` as ``y``. The generator persists across rounds and is broadcast with the global model;
clients use it as an inductive bias during local training.

Server loss (``generator_steps`` Adam steps per round, batches of ``generator_batch_size``
labels drawn uniformly from the labels the round's clients hold)::

    L_G = ensemble_alpha * mean_n sum_k w[y_n, k] * CE(head_k(z_n), y_n)
        + ensemble_eta   * diversity_loss(eps, z)
        - ensemble_beta  * kd_kl(head_student(z), sum_k w[y_n, k] head_k(z_n))

with ``w[y, k] = n_k(y) / n(y)`` (:func:`strategies.weighting.class_weights` on the handshake
label counts) when ``label_weighting`` is true, otherwise the weights of the ``weighting`` plug.

Client loss per local batch (rounds after the first generator has been trained)::

    L = CE(model(x), y)
      + (gen_batch_size / batch_size) * alpha_t * CE(head(G(y_hat)), y_hat)
      + beta_t * KL(softmax(head(G(y))).detach() ‖ softmax(model(x)))

with ``alpha_t = max(1e-4, generative_alpha * 0.98**t)`` (same for ``beta_t``; the reference's
``10 * 0.98**t`` is scaled down by default, see ``generative_alpha`` below), ``t`` the
0-based round index, ``y`` the real batch labels and ``y_hat`` ``gen_batch_size`` labels drawn
uniformly from the labels the generator was trained on.

Conventions (reference code, unless stated):

- Generator: ``[eps, one_hot(y)] -> Linear -> BatchNorm1d -> ReLU -> Linear(latent_dim)``,
  ``eps ~ U[0, 1)`` (the code's ``torch.rand``), hidden 256, noise 32 (MNIST config). Clients
  run it in eval mode (running BatchNorm statistics) and without gradient.
- Client KL: ``KLDivLoss(reduction="batchmean")`` of the model's log-probabilities against the
  detached probabilities of its own head on generated features, ``T = 1``
  (:func:`fedkd.distill.kd_kl_probs`). CE terms are means over the batch.
- Teacher CE: per-sample CE weighted by ``w[y, k]``, summed over teachers, averaged over the
  batch (the code's ``sum_k mean(CE_k * w_k)``). Diversity: :func:`fedkd.distill.diversity_loss`
  (L1 between outputs, squared L2 between noises, ``exp(-mean(.))``).
- Adam(``generator_lr``, weight decay ``generator_weight_decay``) kept across rounds, learning
  rate multiplied by ``generator_lr_decay`` after each round (the code's ExponentialLR 0.98);
  the MNIST config uses lr 3e-4 and weight decay 1e-2.
- Deviations: the label weights use the handshake label counts (the code counts the labels
  each client drew in its last local training, plus one); the student of the adversarial term
  is the freshly aggregated global head (the code uses the previous round's), compared with
  :func:`fedkd.distill.kd_kl` (``batchmean``, ensemble side detached; the code uses
  ``reduction="mean"`` without detaching). The adversarial term is off by default
  (``ensemble_beta = 0``, as in the code). Clients sample ``y_hat`` from the labels the
  generator was trained on (the code's ``available_labels``: every label in the federation).
- The generator is not sent before it has been trained once (round 1 has no regulariser),
  so from round 2 on each client downloads the generator's arrays in addition to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from fedkd.client import ClientEnv, client_fn, seed_for
from fedkd.comm import arrayrecord_to_state_dict, state_dict_to_arrayrecord
from fedkd.distill import diversity_loss, kd_kl, kd_kl_probs, weighted_logits
from fedkd.errors import ScenarioError
from fedkd.train import device_of, train_supervised
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import FedAvg, NodeInfo
from strategies.weighting import TeacherContext, class_weights, make_weighting

TRAIN_TYPE = "train.fedgen"
DECAY = 0.98
MIN_COEF = 1e-4


# ---------------------------------------------------------------------------------- generator
class Generator(nn.Module):
    """Conditional generator of latent features ``G(y, eps)``.

    Parameters
    ----------
    num_classes : int
        Number of labels (width of the one-hot condition).
    latent_dim : int
        Width of the generated features (the clients' ``head`` input).
    noise_dim : int
        Width of the noise ``eps``.
    hidden_dim : int
        Width of the hidden layer.
    """

    def __init__(self, num_classes: int, latent_dim: int, noise_dim: int = 32,
                 hidden_dim: int = 256) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.body = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden_dim),
                                  nn.BatchNorm1d(hidden_dim), nn.ReLU())
        self.out = nn.Linear(hidden_dim, latent_dim)

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, noise_dim)`` noise drawn from ``U[0, 1)``."""
        return torch.rand(n, self.noise_dim, generator=generator)

    def forward(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Latent features ``(N, latent_dim)`` for labels ``y`` and noise ``eps``."""
        cond = F.one_hot(y, self.num_classes).to(eps.dtype)
        return self.out(self.body(torch.cat([eps, cond], dim=1)))


def build_generator(num_classes: int, latent_dim: int, noise_dim: int, hidden_dim: int,
                    seed: int = 0) -> Generator:
    """A generator with a seeded initialisation (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(num_classes, latent_dim, noise_dim, hidden_dim)


def decayed(value: float, t: int, decay: float = DECAY, floor: float = MIN_COEF) -> float:
    """``max(floor, value * decay**t)``: FedGen's client coefficients ``alpha_t``, ``beta_t``."""
    return max(floor, value * decay ** t)


# ---------------------------------------------------------------------------------- losses
@dataclass(frozen=True)
class Heads:
    """K linear heads stacked: ``weight (K, C, D)``, ``bias (K, C)``."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def from_records(cls, records: Sequence[ArrayRecord]) -> Heads:
        """The ``head.weight``/``head.bias`` arrays of each client's model record."""
        sds = [arrayrecord_to_state_dict(r, prefix="head") for r in records]
        return cls(torch.stack([sd["weight"].float() for sd in sds]),
                   torch.stack([sd["bias"].float() for sd in sds]))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """``(K, N, C)`` logits of every head on features ``z`` (differentiable in ``z``)."""
        return torch.einsum("kcd,nd->knc", self.weight, z) + self.bias.unsqueeze(1)


def weighted_teacher_ce(teacher_logits: torch.Tensor, y: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """``mean_n sum_k w[n, k] * CE(logits[k, n], y[n])``.

    Parameters
    ----------
    teacher_logits : torch.Tensor
        ``(K, N, C)``.
    y : torch.Tensor
        ``(N,)`` labels.
    weights : torch.Tensor
        ``(N, K)`` per-sample teacher weights.
    """
    k, n, c = teacher_logits.shape
    ce = F.cross_entropy(teacher_logits.reshape(k * n, c), y.repeat(k),
                         reduction="none").view(k, n)
    return (ce * weights.T.to(ce.dtype)).sum(0).mean()


def generator_loss(z: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, teachers: Heads,
                   weights: torch.Tensor, students: Sequence[Heads] = (),
                   alpha: float = 1.0, beta: float = 0.0,
                   eta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """FedGen's server objective on one generated batch and its parts.

    ``alpha * weighted CE + eta * diversity - beta * mean_s kd_kl(student_s, ensemble)``;
    the adversarial term is only computed when ``beta > 0`` and students are given.
    """
    logits = teachers.logits(z)
    teacher = weighted_teacher_ce(logits, y, weights)
    div = diversity_loss(eps, z)
    loss = alpha * teacher + eta * div
    parts = {"teacher": float(teacher.detach()), "diversity": float(div.detach()),
             "student": 0.0}
    if beta > 0 and students:
        ensemble = weighted_logits(logits, weights)
        adv = torch.stack([kd_kl(s.logits(z)[0], ensemble) for s in students]).mean()
        loss = loss - beta * adv
        parts["student"] = float(adv.detach())
    return loss, parts


def client_regulariser(logits: torch.Tensor, head: nn.Module, z_real: torch.Tensor,
                       z_gen: torch.Tensor, y_gen: torch.Tensor, alpha: float, beta: float,
                       gen_ratio: float) -> torch.Tensor:
    """FedGen's client terms added to ``CE(model(x), y)``.

    ``gen_ratio * alpha * CE(head(z_gen), y_gen) + beta * KL(softmax(head(z_real)).detach()
    ‖ softmax(logits))`` (``batchmean``, ``T = 1``).

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` model logits on the real batch.
    head : nn.Module
        The model's linear head.
    z_real : torch.Tensor
        ``(N, D)`` generated features for the real batch's labels.
    z_gen, y_gen : torch.Tensor
        ``(M, D)`` generated features for the sampled labels ``y_gen``.
    alpha, beta : float
        This round's ``alpha_t`` and ``beta_t``.
    gen_ratio : float
        ``gen_batch_size / batch_size``.
    """
    target = F.softmax(head(z_real), dim=1)
    latent = beta * kd_kl_probs(logits, target)
    teacher = alpha * F.cross_entropy(head(z_gen), y_gen)
    return gen_ratio * teacher + latent


# ---------------------------------------------------------------------------------- server
def check_latent_dims(dims: dict[str, int]) -> int:
    """The one latent width of all architecture groups (FedGen generates one latent space).

    Raises
    ------
    ScenarioError
        When the groups' latent widths differ.
    """
    if len(set(dims.values())) != 1:
        raise ScenarioError("clients.models", dims,
                            "architectures sharing one latent_dim (FedGen's generator "
                            "produces features for every client's head)")
    return next(iter(dims.values()))


def label_pool(label_counts: torch.Tensor) -> torch.Tensor:
    """Labels that at least one of the teachers holds (``sum_k n_k(y) > 0``)."""
    return torch.nonzero(label_counts.sum(0) > 0).flatten()


@STRATEGIES.register("fedgen")
class FedGen(FedAvg):
    """FedAvg plus a server-trained latent generator that regularises local training.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As in :class:`strategies.fedavg.FedAvg`.
    generative_alpha, generative_beta : float
        Initial client coefficients of the generated-sample CE and the latent KL (decay 0.98
        per round). The reference uses 10 with plain SGD at lr 0.01; fedkd's clients use the
        scenario's optimiser (SGD with momentum 0.9 at lr 0.05 in the shipped scenarios, a
        step about 25x larger), with which 10 made local training diverge on digits
        (accuracy 0.10 from round 2) while 1 trains well, so 1 is the default here. Set 10
        together with ``clients.train: {lr: 0.01, momentum: 0}`` for the paper's setting.
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

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 generative_alpha: float = 1.0, generative_beta: float = 1.0,
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
        self.generative_alpha = generative_alpha
        self.generative_beta = generative_beta
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
        self.teacher_weights: dict[int, list[dict[str, float]]] = {}
        self.generator_losses: dict[int, dict[str, float]] = {}

    def bind(self, world: World) -> None:
        """Check that every architecture shares one latent width and build the generator."""
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
    def client_config(self) -> dict[str, Any]:
        """FedGen's client-side hyper-parameters, sent with every train message."""
        return {"fedgen-alpha": self.generative_alpha, "fedgen-beta": self.generative_beta,
                "gen-batch-size": self.gen_batch_size, "noise-dim": self.noise_dim,
                "hidden-dim": self.hidden_dim, "gen-labels": list(self.generator_labels)}

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """Each group's model as ``"arrays"`` plus the trained generator as ``"generator"``."""
        config = ConfigRecord({**dict(config), "server-round": server_round,
                               **self.client_config()})
        extra = {"generator": self.generator_record} if self.generator_record else {}
        contents = {arch: RecordDict({"arrays": rec, **extra, "config": config})
                    for arch, rec in self.current.items()}
        return [Message(contents[n.arch], dst_node_id=n.node_id, message_type=TRAIN_TYPE,
                        group_id=str(server_round)) for n in nodes]

    # ------------------------------------------------------------------ aggregation
    def fuse(self, server_round: int, replies: Sequence[Message],
             groups: dict[str, ArrayRecord], metrics: MetricRecord) -> dict[str, ArrayRecord]:
        """Train the generator on the received clients' heads; the groups stay FedAvg's."""
        teachers = Heads.from_records([r.content.array_records["arrays"] for r in replies])
        students = [Heads.from_records([rec]) for rec in groups.values()]
        infos = [self.node(r.metadata.src_node_id) for r in replies]
        self.train_generator(server_round, teachers, students, infos)
        return groups

    def teacher_context(self, infos: Sequence[NodeInfo]) -> TeacherContext:
        """Sizes and label counts of the round's teachers from the handshake."""
        return TeacherContext(
            num_examples=torch.tensor([i.num_examples for i in infos], dtype=torch.float64),
            label_counts=torch.tensor([i.label_counts for i in infos], dtype=torch.float64))

    def weights_fn(self, ctx: TeacherContext,
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(logits (K, N, C), y) -> (N, K)`` teacher weights of this round."""
        if self.label_weighting:
            table = class_weights(ctx.label_counts).float()
            return lambda logits, y: table[y]
        return lambda logits, y: self.weigh(logits.detach(), ctx, y).float()

    def train_generator(self, server_round: int, teachers: Heads, students: Sequence[Heads],
                        infos: Sequence[NodeInfo]) -> None:
        """``generator_steps`` Adam steps on FedGen's generator loss; records weights/losses."""
        k, num_classes, latent_dim = teachers.weight.shape
        if len(set(int(t.weight.shape[2]) for t in students)) > 1:
            check_latent_dims({str(i): int(t.weight.shape[2]) for i, t in enumerate(students)})
        gen = self.ensure_generator(num_classes, latent_dim)
        ctx = self.teacher_context(infos)
        pool = label_pool(ctx.label_counts)
        weigh = self.weights_fn(ctx)
        rng = torch.Generator().manual_seed(seed_for(self.seed, server_round, 11))
        sums = {"teacher": 0.0, "diversity": 0.0, "student": 0.0}
        w_total = torch.zeros(k, dtype=torch.float64)
        gen.train()
        for _ in range(self.generator_steps):
            y = pool[torch.randint(len(pool), (self.generator_batch_size,), generator=rng)]
            eps = gen.noise(len(y), rng)
            z = gen(y, eps)
            w = weigh(teachers.logits(z), y)
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
        w_mean = (w_total / (steps * self.generator_batch_size)).tolist()
        self.teacher_weights[server_round] = [{"client": i.cid, "weight": float(m)}
                                              for i, m in zip(infos, w_mean, strict=True)]
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


def client_generator(record: ArrayRecord, model: nn.Module, config: ConfigRecord) -> Generator:
    """The received generator, shaped by the model's head and the config's widths."""
    head = model.head
    gen = Generator(head.out_features, head.in_features, int(config["noise-dim"]),
                    int(config["hidden-dim"]))
    gen.load_state_dict(arrayrecord_to_state_dict(record))
    return gen


@client_fn(TRAIN_TYPE)
def train_fedgen(msg: Message, env: ClientEnv) -> RecordDict:
    """Local training with FedGen's generator regulariser (plain CE before one is trained)."""
    model = env.model_from(msg.content.array_records["arrays"])
    data, cfg = env.data, env.train_config
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
    result = train_supervised(model, data.x, data.y, cfg, seed=env.seed(), extra_loss=extra)
    return RecordDict({
        "arrays": state_dict_to_arrayrecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": len(data), "train-loss": result.loss}),
    })

