"""FML: Federated Mutual Learning.

Shen, Zhang, Wang, Lv, Wu, Li, Wang, "Federated Mutual Learning", arXiv:2006.16765, 2020.

Every client keeps a *private* model (its own architecture ``world.archs[cid]``, persistent in
the state store under ``"model"``) and receives the shared *meme* model: the global FedAvg'd
arrays of one homogeneous architecture (``meme_arch``; default the first model group). On
every batch of its private data the two models learn from each other as in deep mutual
learning (Zhang et al. CVPR 2018)::

    L_private = alpha · CE(private, y) + (1 − alpha) · kd_kl(private, meme)
    L_meme    = beta  · CE(meme, y)    + (1 − beta)  · kd_kl(meme, private)

with ``alpha = beta = 0.5`` as the paper. Conventions: ``kd_kl(student, teacher)`` is
``KL(teacher ‖ student)`` on softmax at ``temperature`` (default 1, the paper's plain KL),
``batchmean``, times ``T²``, and the teacher side is detached (each model is the fixed target
of the other's term, as DML). Both models see the same batches (the scenario's train config:
epochs/steps, batch size) and are stepped by one SGD optimizer over both models' parameters
with the scenario's lr, momentum and weight decay; the step loss is ``L_private + L_meme``.
Because each loss only reaches its own model's parameters (the other side is detached) and
SGD is per-parameter, this is exactly two SGD optimizers stepping together.

Only the meme weights travel (down and up); the server averages the memes weighted by
``num-examples``. Central evaluation reports the meme (global) model as ``acc``/``loss``; every
``eval_every`` rounds every client evaluates its private model (``evaluate.private``) and the
server reports their unweighted means as ``acc-private``/``loss-private`` (and
``acc-private-min``), keys that do not clash with the central ``acc``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
from fedkd.distill import kd_kl
from fedkd.errors import ScenarioError
from fedkd.train import batch_indices, fit, sgd
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import NodeInfo, weighted_average
from strategies.local import Local


def mutual_losses(private_logits: torch.Tensor, meme_logits: torch.Tensor, y: torch.Tensor,
                  alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
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
    """
    private = (alpha * F.cross_entropy(private_logits, y)
               + (1 - alpha) * kd_kl(private_logits, meme_logits, temperature))
    meme = (beta * F.cross_entropy(meme_logits, y)
            + (1 - beta) * kd_kl(meme_logits, private_logits, temperature))
    return private, meme


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
    """

    train_type = f"{MessageType.TRAIN}.fml"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 alpha: float = 0.5, beta: float = 0.5, temperature: float = 1.0,
                 meme_arch: str | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ScenarioError(f"strategy.params.{name}", value, "a number in [0, 1]")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.meme_arch = meme_arch

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
        index = world.groups.index(arch)
        model = world.new_model(arch, seed=world.scenario.seed * 1000 + index)
        return join_groups({arch: state_dict_to_arrayrecord(model.state_dict())})

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """Every sampled client receives the meme model and its architecture's name."""
        arch = str(self.meme_arch)
        config = ConfigRecord({**dict(config), "server-round": server_round, "meme-arch": arch,
                               "alpha": self.alpha, "beta": self.beta,
                               "temperature": self.temperature})
        content = RecordDict({"arrays": self.current[arch], "config": config})
        return [Message(content, dst_node_id=n.node_id, message_type=self.train_type,
                        group_id=str(server_round)) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of the returned memes (by ``num-examples``) and of the train metrics."""
        ok = self.split_replies(server_round, replies)
        if not ok:
            return None, None
        meme = weighted_average([r.content.array_records["arrays"] for r in ok],
                                [float(r.content.metric_records["metrics"]["num-examples"])
                                 for r in ok])
        metrics = self.train_metrics_aggr_fn([r.content for r in ok], self.weighted_by_key)
        return join_groups({str(self.meme_arch): meme}), metrics

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Private models' scores as ``acc-private``, ``acc-private-min``, ``loss-private``."""
        fed = super().aggregate_evaluate(server_round, replies)
        if fed is None:
            return None
        return MetricRecord({"acc-private": fed["acc"], "acc-private-min": fed["acc-min"],
                             "loss-private": fed["loss"]})


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
    x, y, dev = env.data.x, env.data.y, env.device
    totals = {"private": 0.0, "meme": 0.0}

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        xb, yb = x[idx].to(dev), y[idx].to(dev)
        lp, lm = mutual_losses(private(xb), meme(xb), yb, alpha, beta, temperature)
        totals["private"] += float(lp.detach()) * len(idx)
        totals["meme"] += float(lm.detach()) * len(idx)
        return lp + lm

    train_cfg = env.train_config
    pair = nn.ModuleList([private, meme])
    gen = torch.Generator().manual_seed(env.seed())
    batches = batch_indices(len(y), train_cfg.batch_size, gen, epochs=train_cfg.epochs,
                            steps=train_cfg.steps)
    result = fit(pair, sgd(pair, train_cfg), batches, step_loss)
    env.save_private(private)
    n = max(result.examples, 1)
    return RecordDict({
        "arrays": state_dict_to_arrayrecord(meme.state_dict()),
        "metrics": MetricRecord({"num-examples": len(y), "train-loss": totals["meme"] / n,
                                 "train-loss-private": totals["private"] / n}),
    })
