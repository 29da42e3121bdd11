"""FedMD: Heterogenous Federated Learning via Model Distillation.

Li & Wang, NeurIPS 2019 Workshop on Federated Learning (arXiv:1910.03581); reference code
``diogenes0319/FedMD_clean`` (``FedMD.py``). Clients keep private models of *any*
architecture (``clients.models``); no weights ever cross the network, only class scores on
public inputs.

Algorithm, as run here
----------------------
Phase 0, transfer learning (once per client, lazily the first time the client is contacted):
if the public split is labeled (``data.public.labeled``), train on it for ``pretrain_epochs``
epochs, then on the private data for ``private_epochs`` epochs (both with the scenario's
local optimiser, :func:`fedkd.train.train_supervised`). On an unlabeled public split only the
private step runs.

Each round, for the sampled clients, within one round of the runner:

1. *Communicate*: the server draws a seeded alignment subset of the public split of
   ``alignment_size`` samples (fresh every round, as ``generate_alignment_data`` in the
   reference) and sends only its seed and size (``query.fedmd_logits``; 0 array bytes). Each
   client replies its logits on it as an ArrayRecord (``N x C`` float32).
2. *Aggregate*: consensus = weighted mean of the logits,
   ``f[n] = sum_k w[n, k] * logits[k, n]`` with ``w`` from the weighting plug (uniform by
   default, which is the reference's plain mean).
3. *Digest*: each client receives the consensus (``train.fedmd_digest``) and fits it on the
   alignment subset with :func:`fedkd.distill.logit_mae` (mean absolute error between its
   pre-softmax logits and the consensus, averaged over samples *and* classes, like Keras'
   ``mean_absolute_error``; the consensus is a detached constant) with Adam
   (``digest_lr = 1e-3``, ``digest_batch_size = 32``, ``digest_epochs = 1``), as the reference
   does with its softmax-stripped ``model_logits`` twin.
4. *Revisit*: it trains on its private data with the scenario's local training (``clients.train``,
   or ``revisit_epochs`` epochs of it; SGD, where the reference uses Adam 1e-3 for this step
   too), and keeps the model.

Steps 1-3 happen in one runner round: :meth:`FedMD.configure_train` queries the logits with
``grid.send_and_receive`` on the accounting grid, so their bytes count in the round, and then
returns the digest messages. Accuracy is the mean test accuracy of the clients' private
models (``evaluate.private``, inherited from :class:`strategies.local.Local`).

Deviations from the reference: Adam's moments are not kept across rounds (the reference's
compiled Keras model keeps them), and the temperature is not used (logits are matched raw).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedkd.client import ClientEnv, client_fn, seed_for
from fedkd.distill import logit_mae, weighted_logits
from fedkd.errors import ScenarioError
from fedkd.train import batch_indices, fit, predict, train_supervised
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import NodeInfo
from strategies.local import Local
from strategies.weighting import TeacherContext, Weighting, make_weighting, weight_rows

QUERY_TYPE = f"{MessageType.QUERY}.fedmd_logits"
DIGEST_TYPE = f"{MessageType.TRAIN}.fedmd_digest"


# ----------------------------------------------------------------------------- shared helpers
def public_subset(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted seeded subset of ``min(size, n)`` indices of a public split of ``n`` samples.

    The server and every client call it with the same arguments, so only the seed travels.
    """
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def logits_record(logits: torch.Tensor) -> ArrayRecord:
    """An ``(N, C)`` float32 logits tensor as a one-array record."""
    return ArrayRecord({"logits": Array(logits.detach().to(torch.float32).numpy())})


def record_logits(record: ArrayRecord) -> torch.Tensor:
    """The inverse of :func:`logits_record`."""
    return torch.from_numpy(np.array(record["logits"].numpy(), dtype=np.float32))


def teacher_context(nodes: Sequence[NodeInfo]) -> TeacherContext:
    """What the handshake knows about the teachers ``nodes`` (sizes, label counts)."""
    return TeacherContext(
        num_examples=torch.tensor([n.num_examples for n in nodes], dtype=torch.float64),
        label_counts=torch.tensor([list(n.label_counts) for n in nodes], dtype=torch.float64))


def consensus(logits: torch.Tensor, weighting: Weighting, ctx: TeacherContext,
              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FedMD consensus: the weighted mean of the clients' logits.

    Parameters
    ----------
    logits : torch.Tensor
        ``(K, N, C)`` logits of K clients on the N alignment samples.
    weighting : Weighting
        The weighting plug, giving ``(N, K)`` weights.
    ctx : TeacherContext
        What the server knows about the K clients.
    labels : torch.Tensor, optional
        Alignment labels, only when the public split is labeled.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        The ``(N, C)`` consensus and the ``(N, K)`` weights.
    """
    weights = weighting(logits, ctx, labels)
    return weighted_logits(logits, weights), weights


def check_positive(path: str, value: float) -> None:
    """Raise a ScenarioError unless ``value > 0``."""
    if not value > 0:
        raise ScenarioError(path, value, "a positive number")


def require_public(world: World, who: str) -> None:
    """Raise a ScenarioError if the world has no public split."""
    if world.data.public is None or len(world.data.public) == 0:
        raise ScenarioError("data.public.fraction", world.scenario.data.public.fraction,
                            f"a positive fraction or data.public.dataset ({who} needs a "
                            "public split)")


# ----------------------------------------------------------------------------- strategy
@STRATEGIES.register("fedmd")
class FedMD(Local):
    """FedMD: clients exchange logits on a public alignment subset and digest the consensus.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed
        Participation and seeding (from the scenario).
    alignment_size : int
        Public samples in each round's alignment subset (capped at the public split's size).
    pretrain_epochs : int
        Transfer learning: epochs on the labeled public split (skipped if unlabeled).
    private_epochs : int
        Transfer learning: epochs on the private data after the public ones.
    digest_epochs : int
        Epochs fitting the consensus on the alignment subset.
    digest_lr : float
        Adam learning rate of the digest step.
    digest_batch_size : int
        Batch size of the digest step.
    revisit_epochs : int, optional
        Epochs on the private data after digesting, with the scenario's optimiser; None (the
        default) runs the scenario's own local training (``clients.train``), so FedMD does the
        same private work per round as every other strategy and as training alone.
    weighting : str
        Weighting plug giving the consensus weights (``strategies/weighting.py``).
    weighting_params : dict, optional
        Its parameters.
    """

    train_type = DIGEST_TYPE

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, alignment_size: int = 500,
                 pretrain_epochs: int = 1, private_epochs: int = 1, digest_epochs: int = 1,
                 digest_lr: float = 1e-3, digest_batch_size: int = 32,
                 revisit_epochs: int | None = None, weighting: str = "uniform",
                 weighting_params: dict[str, Any] | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed)
        check_positive("strategy.params.alignment_size", alignment_size)
        check_positive("strategy.params.digest_lr", digest_lr)
        check_positive("strategy.params.digest_batch_size", digest_batch_size)
        self.alignment_size = alignment_size
        self.pretrain_epochs = pretrain_epochs
        self.private_epochs = private_epochs
        self.digest_epochs = digest_epochs
        self.digest_lr = digest_lr
        self.digest_batch_size = digest_batch_size
        self.revisit_epochs = revisit_epochs
        self.weighting = weighting
        self.weighting_params = weighting_params
        self.weigh = make_weighting(weighting, weighting_params)
        self.teacher_weights: dict[int, list[dict[str, Any]]] = {}

    def bind(self, world: World) -> None:
        """Bind the world; FedMD needs a public split."""
        require_public(world, "fedmd")
        super().bind(world)

    def subset_seed(self, server_round: int) -> int:
        """Seed of this round's alignment subset."""
        return seed_for(self.seed, server_round, 4242)

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The round's train config plus FedMD's hyper-parameters and the subset seed."""
        return ConfigRecord({
            **dict(config), "server-round": server_round,
            "subset-seed": self.subset_seed(server_round), "subset-size": self.alignment_size,
            "pretrain-epochs": self.pretrain_epochs, "private-epochs": self.private_epochs,
            "digest-epochs": self.digest_epochs, "digest-lr": self.digest_lr,
            "digest-batch-size": self.digest_batch_size,
            "revisit-epochs": -1 if self.revisit_epochs is None else self.revisit_epochs})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Query the sampled clients' logits, form the consensus, return the digest messages."""
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        cfg = self.round_config(server_round, config)
        replies = query_logits(grid, nodes, cfg, QUERY_TYPE, server_round)
        if not replies:
            return []
        answered = [self.node(r.metadata.src_node_id) for r in replies]
        logits = torch.stack([record_logits(r.content.array_records["logits"])
                              for r in replies])
        target, weights = consensus(logits, self.weigh, teacher_context(answered),
                                    self.public_labels(server_round))
        classes = target.argmax(1) if self.weighting == "class_counts" else None
        self.teacher_weights[server_round] = weight_rows([n.cid for n in answered], weights,
                                                         classes)
        content = RecordDict({"consensus": logits_record(target), "config": cfg})
        return [Message(content, dst_node_id=n.node_id, message_type=self.train_type,
                        group_id=str(server_round)) for n in answered]

    def public_labels(self, server_round: int) -> torch.Tensor | None:
        """Labels of this round's alignment subset if the public split is labeled."""
        if self.world is None or not self.world.data.public_labeled:
            return None
        pub = self.world.data.public
        return pub.y[public_subset(len(pub), self.alignment_size,
                                   self.subset_seed(server_round))]


def query_logits(grid: Grid, nodes: Sequence[NodeInfo], config: ConfigRecord,
                 message_type: str, server_round: int) -> list[Message]:
    """Send a config-only query to ``nodes``; the replies without errors, in node order."""
    msgs = [Message(RecordDict({"config": config}), dst_node_id=n.node_id,
                    message_type=message_type, group_id=str(server_round)) for n in nodes]
    return [r for r in grid.send_and_receive(msgs) if not r.has_error()]


# ----------------------------------------------------------------------------- client side
def alignment_inputs(env: ClientEnv) -> torch.Tensor:
    """This round's public subset inputs, from the seed and size in the config."""
    pub = env.world.data.public
    idx = public_subset(len(pub), int(env.config["subset-size"]), int(env.config["subset-seed"]))
    return pub.x[idx]


def transfer_learning(model: torch.nn.Module, env: ClientEnv) -> None:
    """FedMD phase 0: labeled public data (if allowed), then private data."""
    cfg = env.train_config
    pub = env.world.data.public
    pretrain = int(env.config.get("pretrain-epochs", 1))
    if env.world.data.public_labeled and pretrain > 0:
        train_supervised(model, pub.x, pub.y, dataclasses.replace(cfg, epochs=pretrain,
                                                                  steps=None), seed=env.seed(10))
    private = int(env.config.get("private-epochs", 1))
    if private > 0:
        train_supervised(model, env.data.x, env.data.y,
                         dataclasses.replace(cfg, epochs=private, steps=None), seed=env.seed(11))


@client_fn(QUERY_TYPE)
def fedmd_logits(msg: Message, env: ClientEnv) -> RecordDict:
    """Reply this client's logits on the alignment subset (transfer learning on first call)."""
    model, existed = env.private_model()
    if not existed:
        transfer_learning(model, env)
        env.save_private(model)
    logits = predict(model, alignment_inputs(env))
    return RecordDict({"logits": logits_record(logits)})


def digest(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, epochs: int,
           lr: float, batch_size: int, seed: int) -> float:
    """Fit ``model``'s logits on ``x`` to ``target`` with :func:`logit_mae` and Adam."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    result = fit(model, opt, batch_indices(len(x), batch_size, gen, epochs=epochs),
                 lambda idx: logit_mae(model(x[idx]), target[idx]))
    return result.loss


@client_fn(DIGEST_TYPE)
def fedmd_digest(msg: Message, env: ClientEnv) -> RecordDict:
    """Digest the consensus on the alignment subset, then revisit the private data."""
    model, existed = env.private_model()
    if not existed:
        transfer_learning(model, env)
    target = record_logits(msg.content.array_records["consensus"])
    cfg = env.config
    digest_loss = digest(model, alignment_inputs(env), target, int(cfg["digest-epochs"]),
                         float(cfg["digest-lr"]), int(cfg["digest-batch-size"]), env.seed(12))
    revisit = int(cfg["revisit-epochs"])
    loss = float("nan")
    if revisit != 0:
        local = (env.train_config if revisit < 0 else
                 dataclasses.replace(env.train_config, epochs=revisit, steps=None))
        loss = train_supervised(model, env.data.x, env.data.y, local, seed=env.seed()).loss
    env.save_private(model)
    return RecordDict({"metrics": MetricRecord({"num-examples": len(env.data),
                                                "train-loss": loss,
                                                "digest-loss": digest_loss})})
