"""FML: Federated Mutual Learning.

Shen, Zhang, Wang, Lv, Wu, Li, Wang, "Federated Mutual Learning", arXiv:2006.16765, 2020.

Every client keeps a *private* model (its own architecture ``world.archs[cid]``, persistent in
the state store under ``"model"``) and receives the shared *meme* model: the global FedAvg'd
arrays of one homogeneous architecture (``meme_arch``; default the first model group). On
every batch of its private data the two models learn from each other as in deep mutual
learning (Zhang et al. CVPR 2018)::

    L_private = alpha · CE(private, y) + (1 − alpha) · kd_kl(private, meme)
    L_meme    = beta  · CE(meme, y)    + (1 − beta)  · kd_kl(meme, private)

with ``alpha = beta = 0.5`` as the paper (reference code: github.com/ZJU-DAI/
Federated-Mutual-Learning, ``Trainer.py`` ``train_mutual``, ``Node.py``). Conventions:
``kd_kl(student, teacher)`` is ``KL(teacher ‖ student)`` on softmax at ``temperature``
(default 1, the paper's plain KL), times ``T²``, the teacher side detached (each model is the
fixed target of the other's term, as DML), reduced by ``kl_reduction``:

- ``batchmean`` (default, the reference's ``nn.KLDivLoss(reduction="batchmean")``): the sum
  over classes averaged over the batch, the true per-sample KL;
- ``mean``: averaged over batch *and* classes, i.e. ``batchmean / C`` (PyTorch's default
  reduction, which e.g. PFLlib's FML client uses);
- ``sum``: summed over the batch, ``N · batchmean``.

Both models see the same batches (the scenario's train config: epochs/steps, batch size); the
step loss is ``L_private + L_meme``. Because each loss only reaches its own model's parameters
(the other side is detached) and the optimizers below are per-parameter, one optimizer with
a parameter group per model is exactly the reference's two optimizers stepping together.
``optimizer`` chooses them:

- ``joint`` (default): SGD with the scenario's lr, momentum and weight decay for both models,
  built afresh every round;
- ``sgd``: the reference's ``--optimizer sgd``: SGD with the scenario's lr and momentum and
  the reference's fixed weight decay 5e-4 for each model;
- ``adam``: the reference's ``--optimizer adam``: Adam with the scenario's lr and weight decay
  1e-4 for each model.

With ``sgd``/``adam`` the private optimizer's state (momentum buffers, Adam moments) persists
across rounds in the state store (key ``"optimizer"``), as the reference's per-node optimizer
does, while the meme's is rebuilt every round (the reference's ``fork`` re-creates it with the
received meme). ``joint`` stays the default so earlier results hold: per step it is the same
update as ``sgd`` but for the weight decay and the private momentum restarting each round.
Not reproduced: the reference's step decay of the learning rate (x0.1 every ``R // 3`` rounds,
``utils.LR_scheduler``); fedkd keeps the scenario's constant learning rate. Quickstart
(digits, 10 rounds): meme ``acc`` 0.767 / mean private 0.382 with ``joint``, 0.786 / 0.469
with ``sgd``.

Only the meme weights travel (down and up); the server averages the memes weighted by
``num-examples``. Central evaluation reports the meme (global) model as ``acc``/``loss``; every
``eval_every`` rounds every client evaluates its private model (``evaluate.private``) and the
server reports their unweighted means as ``acc-private``/``loss-private`` (and
``acc-private-min``), keys that do not clash with the central ``acc``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn

from fedkd.client import ClientEnv, client_fn
from fedkd.comm import arrayrecord_to_state_dict, join_groups, state_dict_to_arrayrecord
from fedkd.errors import ScenarioError
from fedkd.scenario import TrainConfig
from fedkd.train import batch_indices, fit, sgd
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import NodeInfo, weighted_average
from strategies.local import Local

OPTIMIZERS = ("joint", "sgd", "adam")
KL_REDUCTIONS = ("batchmean", "mean", "sum")
#: The weight decay the reference code fixes for each of its optimizers (``init_optimizer``).
REFERENCE_WEIGHT_DECAY = {"sgd": 5e-4, "adam": 1e-4}


def mutual_kl_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, teacher detached.

    ``reduction``: ``batchmean`` (sum / N, :func:`fedkd.distill.kd_kl`), ``mean`` (sum / N·C,
    PyTorch's elementwise mean) or ``sum``.
    """
    t = temperature
    target = F.softmax(teacher_logits.detach() / t, dim=1)
    log_student = F.log_softmax(student_logits / t, dim=1)
    if reduction == "mean":  # spelled out: PyTorch announces "mean" will become "batchmean"
        return F.kl_div(log_student, target, reduction="sum") / student_logits.numel() * t * t
    return F.kl_div(log_student, target, reduction=reduction) * t * t


def mutual_losses(private_logits: torch.Tensor, meme_logits: torch.Tensor, y: torch.Tensor,
                  alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
                  reduction: str = "batchmean") -> tuple[torch.Tensor, torch.Tensor]:
    """FML's two losses on one batch: ``(L_private, L_meme)``.

    Parameters
    ----------
    private_logits, meme_logits : torch.Tensor
        ``(N, C)`` logits of the private and the meme model.
    y : torch.Tensor
        ``(N,)`` labels.
    alpha, beta : float
        Weight of the cross-entropy in the private / meme loss (the KL gets ``1 − ·``).
    temperature : float
        KL temperature.
    reduction : str
        KL reduction: ``batchmean``, ``mean`` or ``sum``.
    """
    private = (alpha * F.cross_entropy(private_logits, y) + (1 - alpha)
               * mutual_kl_term(private_logits, meme_logits, temperature, reduction))
    meme = (beta * F.cross_entropy(meme_logits, y) + (1 - beta)
            * mutual_kl_term(meme_logits, private_logits, temperature, reduction))
    return private, meme


def mutual_optimizer(kind: str, private: nn.Module, meme: nn.Module,
                     cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer of both models: one parameter group per model (``joint``: one group).

    ``joint``: :func:`fedkd.train.sgd` with the scenario's settings; ``sgd``/``adam``: the
    reference's, with the scenario's lr (and momentum) and its fixed weight decay.
    """
    if kind == "joint":
        return sgd(nn.ModuleList([private, meme]), cfg)
    groups = [{"params": list(private.parameters())}, {"params": list(meme.parameters())}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=REFERENCE_WEIGHT_DECAY["sgd"])
    if kind == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=REFERENCE_WEIGHT_DECAY["adam"])
    raise ValueError(f"unknown optimizer {kind!r}; one of {OPTIMIZERS}")


def optimizer_state(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                    ) -> dict[str, torch.Tensor]:
    """The per-parameter state tensors of ``params`` as ``{"<index>.<name>": tensor}``."""
    return {f"{i}.{name}": value for i, p in enumerate(params)
            for name, value in opt.state.get(p, {}).items() if isinstance(value, torch.Tensor)}


def load_optimizer_state(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                         saved: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`optimizer_state` (Adam's ``step`` counters stay on the CPU)."""
    for key, value in saved.items():
        index, name = key.split(".", 1)
        p = params[int(index)]
        opt.state[p][name] = value if name == "step" else value.to(p.device)


@STRATEGIES.register("fml")
class FML(Local):
    """Federated mutual learning: private models stay home, the meme model is FedAvg'd.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As :class:`strategies.fedavg.FedAvg`.
    alpha : float
        CE weight of the private model's loss (KL from the meme gets ``1 − alpha``).
    beta : float
        CE weight of the meme model's loss (KL from the private model gets ``1 − beta``).
    temperature : float
        Temperature of both KL terms.
    meme_arch : str, optional
        Architecture of the shared meme model (one of the scenario's model groups); default
        the first group.
    optimizer : str
        ``joint`` (default: one SGD with the scenario's settings), ``sgd`` or ``adam`` (the
        reference's two optimizers and weight decays, private state kept across rounds).
    kl_reduction : str
        Reduction of both KL terms: ``batchmean`` (default, the reference's), ``mean`` or
        ``sum``.
    """

    train_type = f"{MessageType.TRAIN}.fml"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
                 meme_arch: str | None = None,
                 optimizer: Literal["joint", "sgd", "adam"] = "joint",
                 kl_reduction: Literal["batchmean", "mean", "sum"] = "batchmean") -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ScenarioError(f"strategy.params.{name}", value, "a number in [0, 1]")
        for name, value, allowed in (("optimizer", optimizer, OPTIMIZERS),
                                     ("kl_reduction", kl_reduction, KL_REDUCTIONS)):
            if value not in allowed:
                raise ScenarioError(f"strategy.params.{name}", value, f"one of {list(allowed)}")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.meme_arch = meme_arch
        self.optimizer, self.kl_reduction = optimizer, kl_reduction

    def bind(self, world: World) -> None:
        """Bind the world and resolve ``meme_arch`` (must be one of the model groups)."""
        super().bind(world)
        if self.meme_arch is None:
            self.meme_arch = world.groups[0]
        elif self.meme_arch not in world.groups:
            raise ScenarioError("strategy.params.meme_arch", self.meme_arch,
                                f"one of the scenario's model groups {list(world.groups)}")

    def initial_arrays(self, world: World) -> ArrayRecord:
        """The seeded initial meme model (one group, keys ``<meme_arch>.<param>``)."""
        if self.meme_arch is None:
            self.bind(world)
        arch = str(self.meme_arch)
        model = world.new_model(arch, seed=world.init_seed(arch))
        return join_groups({arch: state_dict_to_arrayrecord(model.state_dict())})

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """Every sampled client receives the meme model and its architecture's name."""
        arch = str(self.meme_arch)
        config = ConfigRecord({**dict(config), "server-round": server_round, "meme-arch": arch,
                               "alpha": self.alpha, "beta": self.beta,
                               "temperature": self.temperature, "optimizer": self.optimizer,
                               "kl-reduction": self.kl_reduction})
        content = RecordDict({"arrays": self.current[arch], "config": config})
        return self.messages_to(content, nodes, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the returned memes (by ``num-examples``) and of the train metrics."""
        ok = self.split_replies(server_round, replies)
        if not ok:
            return None, None
        meme = weighted_average([r.content.array_records["arrays"] for r in ok],
                                [float(r.content.metric_records["metrics"]["num-examples"])
                                 for r in ok])
        metrics = self.train_metrics(ok)
        return join_groups({str(self.meme_arch): meme}), metrics

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Private models' scores as ``acc-private``, ``acc-private-min``, ``loss-private``,
        and their local-test metrics as ``local-acc-private``... (the meme's ``local-acc`` is
        computed on the server)."""
        fed = super().aggregate_evaluate(server_round, replies)
        if fed is None:
            return None
        local = {k.replace("local-acc", "local-acc-private").replace("local-loss",
                                                                    "local-loss-private"): v
                 for k, v in fed.items() if k.startswith("local-")}
        return MetricRecord({"acc-private": fed["acc"], "acc-private-min": fed["acc-min"],
                             "loss-private": fed["loss"], **local})


def _meme_model(env: ClientEnv, arch: str, record: ArrayRecord) -> nn.Module:
    """The meme architecture loaded with the received arrays."""
    model = env.world.new_model(arch, seed=0)
    model.load_state_dict(arrayrecord_to_state_dict(record))
    return model.to(env.device)


@client_fn("train.fml")
def train_fml(msg: Message, env: ClientEnv) -> RecordDict:
    """Mutual learning of the private and the meme model; send back the meme only."""
    cfg = env.config
    meme = _meme_model(env, str(cfg["meme-arch"]), msg.content.array_records["arrays"])
    private, _ = env.private_model()
    alpha, beta = float(cfg.get("alpha", 0.5)), float(cfg.get("beta", 0.5))
    temperature = float(cfg.get("temperature", 1.0))
    reduction = str(cfg.get("kl-reduction", "batchmean"))
    kind = str(cfg.get("optimizer", "joint"))
    x, y, dev = env.data.x, env.data.y, env.device
    totals = {"private": 0.0, "meme": 0.0}

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        xb, yb = x[idx].to(dev), y[idx].to(dev)
        lp, lm = mutual_losses(private(xb), meme(xb), yb, alpha, beta, temperature, reduction)
        totals["private"] += float(lp.detach()) * len(idx)
        totals["meme"] += float(lm.detach()) * len(idx)
        return lp + lm

    train_cfg = env.train_config
    pair = nn.ModuleList([private, meme])
    opt = mutual_optimizer(kind, private, meme, train_cfg)
    own = list(private.parameters())
    saved = env.store.load(env.cid, "optimizer") if kind != "joint" else None
    if saved is not None:
        load_optimizer_state(opt, own, saved)
    gen = torch.Generator().manual_seed(env.seed())
    batches = batch_indices(len(y), train_cfg.batch_size, gen, epochs=train_cfg.epochs,
                            steps=train_cfg.steps)
    result = fit(pair, opt, batches, step_loss)
    env.save_private(private)
    if kind != "joint":
        env.store.save(env.cid, "optimizer", optimizer_state(opt, own))
    n = max(result.examples, 1)
    return RecordDict({
        "arrays": state_dict_to_arrayrecord(meme.state_dict()),
        "metrics": MetricRecord({"num-examples": len(y), "train-loss": totals["meme"] / n,
                                 "train-loss-private": totals["private"] / n}),
    })
