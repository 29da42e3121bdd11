"""DS-FL: distillation-based semi-supervised federated learning, with entropy reduction aggregation.

Itahara, Nishio, Koda, Morikura, Yamamoto, "Distillation-Based Semi-Supervised Federated
Learning for Communication-Efficient Collaborative Training with Non-IID Private Data",
IEEE TMC 2021 (arXiv:2008.06180). No code was released with the paper; the reimplementation
by the authors' group (``kitsuyaazuma/SCARLET``, ``algorithm/dsfl.py``, and its BlazeFL
example) was read for the details below.

Clients keep private models of any architecture (``clients.models``); only soft labels on
an unlabeled open set (``data.public``) cross the network, so heterogeneous models work by
construction. Each round, for the sampled clients, within one runner round:

1. *Update and predict* (``train.dsfl_update``; the server sends only a seed and a size):
   each client trains its private model on its private data with the scenario's local
   training (``clients.train``, exactly as :mod:`strategies.local`), then replies its
   softmax probabilities (the paper's "local logits") on this round's seeded open subset of
   ``open_size`` samples (``N x C`` float32).
2. *Aggregate*: ``sa`` is the plain mean of the clients' probabilities; ``era`` (the
   default) sharpens that mean with :func:`fedkd.distill.era`, ``softmax(mean / T)`` with
   ``T = 0.1`` (the paper's and the reference's default).
3. *Distil* (``train.dsfl_distill``): each client receives the global soft labels and fits
   them on the open subset for ``distill_epochs`` epochs with the scenario's SGD (learning
   rate ``distill_lr``, the local one by default), then keeps its model.

Accuracy is the mean test accuracy of the clients' private models (``evaluate.private``,
inherited from :class:`strategies.local.Local`). With ``distill_epochs: 0`` every client
trains exactly as in training alone (``local``). Each round records ``train-loss`` (private
training), ``distill-loss``, and ``label-entropy`` / ``label-entropy-sa``: the mean entropy of
the global soft labels sent and of the plain mean they came from. ERA only lowers it where
the mean is peaked enough: near the uniform distribution over ``C`` classes it sharpens only
when ``T < 1/C``, so weak early models give near-uniform labels.

Loss conventions (pinned in ``tests/test_dsfl.py``):

- the distillation loss is ``KL(global ‖ local)`` with ``reduction="batchmean"`` between the
  global soft labels and ``softmax(local logits)`` at ``T = 1`` (no ``T²`` factor), as the
  reference's ``F.kl_div(log_softmax(output), soft_label, reduction="batchmean")``
  (:func:`fedkd.distill.kd_kl_probs`); it has the same gradient as the cross-entropy with
  soft targets and differs from it only by the targets' entropy, a constant;
- ERA's temperature acts on the averaged *probabilities*, never on logits; the global soft
  labels are constants (detached) on the client.

Where fedkd differs: the paper also distils a server-side global model on the global soft
labels; fedkd reports the clients' models only. The round runs in the paper's order (local
update, prediction, aggregation, distillation) where the reference shifts it (distil with the
previous round's labels, then train, then predict). The distillation optimiser is the
scenario's SGD (momentum, weight decay; fresh each round) where the reference uses plain SGD
at its own ``kd_lr``; its batch size is ``clients.train.batch_size``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedkd.client import ClientEnv, client_fn
from fedkd.distill import era, kd_kl_probs
from fedkd.errors import ScenarioError
from fedkd.scenario import TrainConfig
from fedkd.train import batch_indices, device_of, fit, predict, sgd, train_supervised
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedmd import (
    PublicSubset,
    alignment_inputs,
    logits_record,
    query_logits,
    record_logits,
    require_public,
)
from strategies.local import Local

UPDATE_TYPE = f"{MessageType.TRAIN}.dsfl_update"
DISTILL_TYPE = f"{MessageType.TRAIN}.dsfl_distill"
AGGREGATIONS = ("era", "sa")


def aggregate_soft_labels(probs: torch.Tensor, aggregation: str = "era",
                          temperature: float = 0.1) -> torch.Tensor:
    """Global soft labels from the clients' probabilities.

    Parameters
    ----------
    probs : torch.Tensor
        ``(K, N, C)`` softmax outputs of K clients on the N open samples.
    aggregation : str
        ``"sa"``: their mean; ``"era"``: :func:`fedkd.distill.era` of their mean.
    temperature : float
        ERA's temperature ``T``.
    """
    mean = probs.mean(dim=0)
    if aggregation == "sa":
        return mean
    if aggregation == "era":
        return era(mean, temperature)
    raise ScenarioError("strategy.params.aggregation", aggregation, " | ".join(AGGREGATIONS))


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean over rows of the entropy (nats) of ``(N, C)`` probability rows."""
    return float(-(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean())


@STRATEGIES.register("dsfl")
class DSFL(PublicSubset, Local):
    """DS-FL: clients exchange soft labels on open data, aggregated with ERA, and distil them.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed
        Participation and seeding (from the scenario).
    aggregation : str
        ``"era"`` (entropy reduction aggregation, the paper's proposal) or ``"sa"`` (simple
        averaging).
    temperature : float
        ERA's temperature ``T`` (paper: 0.1; lower sharpens more).
    open_size : int
        Open samples in each round's seeded subset (capped at the public split's size).
    distill_epochs : int
        Epochs fitting the global soft labels on the open subset (0: training alone).
    distill_lr : float, optional
        SGD learning rate of the distillation; None (the default) uses ``clients.train.lr``.
    """

    train_type = DISTILL_TYPE
    subset_salt = 5151

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, aggregation: str = "era",
                 temperature: float = 0.1, open_size: int = 1000, distill_epochs: int = 2,
                 distill_lr: float | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed)
        _check(aggregation in AGGREGATIONS, "aggregation", aggregation, " | ".join(AGGREGATIONS))
        _check(temperature > 0, "temperature", temperature, "a number > 0 (paper: 0.1)")
        _check(open_size > 0, "open_size", open_size, "an integer > 0")
        _check(distill_epochs >= 0, "distill_epochs", distill_epochs, "an integer >= 0")
        _check(distill_lr is None or distill_lr > 0, "distill_lr", distill_lr,
               "a number > 0, or null for clients.train.lr")
        self.aggregation = aggregation
        self.temperature = temperature
        self.open_size = open_size
        self.distill_epochs = distill_epochs
        self.distill_lr = distill_lr
        self.update_metrics: dict[int, dict[str, float]] = {}

    def bind(self, world: World) -> None:
        """Bind the world; DS-FL needs an open (public) split."""
        require_public(world, "dsfl")
        super().bind(world)

    @property
    def subset_n(self) -> int:
        """Samples of each round's open subset: ``open_size`` (capped at the split)."""
        return self.open_size

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The round's train config plus the open subset and the distillation settings."""
        return ConfigRecord({
            **dict(config), "server-round": server_round,
            "subset-seed": self.subset_seed(server_round), "subset-size": self.open_size,
            "distill-epochs": self.distill_epochs,
            "distill-lr": -1.0 if self.distill_lr is None else float(self.distill_lr)})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Run the sampled clients' update and prediction, aggregate, return distil messages."""
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        cfg = self.round_config(server_round, config)
        replies = query_logits(grid, nodes, cfg, UPDATE_TYPE, server_round)
        if not replies:
            return []
        probs = torch.stack([record_logits(r.content.array_records["soft-labels"])
                             for r in replies])
        target = aggregate_soft_labels(probs, self.aggregation, self.temperature)
        stats = dict(self.train_metrics(replies))
        stats.update({"label-entropy": mean_entropy(target),
                      "label-entropy-sa": mean_entropy(probs.mean(dim=0))})
        self.update_metrics[server_round] = stats
        content = RecordDict({"soft-labels": logits_record(target), "config": cfg})
        return self.messages_to(content, [self.node(r.metadata.src_node_id) for r in replies],
                                server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The update's train loss and soft-label entropies, with the distillation loss."""
        _, metrics = super().aggregate_train(server_round, replies)
        if metrics is None:
            return None, None
        return None, MetricRecord({**self.update_metrics.pop(server_round, {}),
                                   **dict(metrics)})


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ScenarioError(f"strategy.params.{name}", value, allowed)


# ----------------------------------------------------------------------------- client side
def distill_soft_labels(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                        cfg: TrainConfig, epochs: int, seed: int) -> float:
    """Fit ``softmax(model(x))`` to the soft labels ``target`` with SGD; the mean loss.

    The loss is :func:`fedkd.distill.kd_kl_probs` at ``T = 1``: ``KL(target ‖ model)``,
    batch mean, target detached. Batches of ``cfg.batch_size`` for ``epochs`` epochs.
    """
    dev = device_of(model)
    batches = batch_indices(len(x), cfg.batch_size, torch.Generator().manual_seed(seed),
                            epochs=epochs)
    return fit(model, sgd(model, cfg), batches,
               lambda idx: kd_kl_probs(model(x[idx].to(dev)), target[idx].to(dev))).loss


@client_fn(UPDATE_TYPE)
def dsfl_update(msg: Message, env: ClientEnv) -> RecordDict:
    """Train the private model on private data, keep it, reply its probabilities on open data."""
    model, _ = env.private_model()
    result = train_supervised(model, env.data.x, env.data.y, env.train_config, seed=env.seed())
    env.save_private(model)
    probs = F.softmax(predict(model, alignment_inputs(env)), dim=1)
    return RecordDict({"soft-labels": logits_record(probs),
                       "metrics": MetricRecord({"num-examples": len(env.data),
                                                "train-loss": result.loss})})


@client_fn(DISTILL_TYPE)
def dsfl_distill(msg: Message, env: ClientEnv) -> RecordDict:
    """Distil the global soft labels on this round's open subset into the private model."""
    model, _ = env.private_model()
    target = record_logits(msg.content.array_records["soft-labels"])
    lr = float(env.config["distill-lr"])
    cfg = env.train_config if lr < 0 else dataclasses.replace(env.train_config, lr=lr)
    loss = distill_soft_labels(model, alignment_inputs(env), target, cfg,
                               int(env.config["distill-epochs"]), env.seed(21))
    env.save_private(model)
    return RecordDict({"metrics": MetricRecord({"num-examples": len(env.data),
                                                "distill-loss": loss})})
