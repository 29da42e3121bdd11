"""FedMD: Heterogenous Federated Learning via Model Distillation.

Li & Wang, NeurIPS 2019 Workshop on Federated Learning (arXiv:1910.03581); reference code
``diogenes0319/FedMD_clean`` (``FedMD.py``, ``Neural_Networks.py``, ``conf/*.json``). Clients
keep private models of *any* architecture (``clients.models``); no weights ever cross the
network, only class scores on public inputs.

Schedule (the reference's defaults, each a ``strategy.params`` key)
-------------------------------------------------------------------
Phase 0, transfer learning, once per client, the first time it is sampled (its model is then
kept with ``env.save_private``; :func:`strategies.local.transfer_learning`, which ``local``
runs too with the same keys, so that training alone can start from the very same models);
both stages train one epoch at a time, cross-entropy averaged over the batch, and stop as
Keras' ``EarlyStopping(monitor="val_acc", min_delta, patience)``, without restoring the best
weights:

a. *public* (``pretrain_public_*``): on the labeled public split (``data.public.labeled``),
   Adam ``lr = 1e-3``, batch 128, at most 20 epochs, patience 3 (``train_models`` with the
   configs' ``pre_train_params``). Skipped on an unlabeled public split: ``bind`` logs a
   warning and the round metric ``pretrain_public_epochs`` is 0;
b. *private* (``pretrain_private_*``): on the client's own data, Adam 1e-3, batch 32, at most
   25 epochs, patience 10 (``FedMD.__init__``).

``min_delta = 0.001`` and the monitored split is a seeded ``holdout_fraction = 0.1`` of the
stage's own data (public split, client data), not trained on during that stage. Round
metrics: ``pretrained`` (clients pre-trained this round), their mean ``pretrain_public_epochs``,
``pretrain_private_epochs`` and ``pretrain_private_val_acc``.

Each round, for the sampled clients, within one runner round:

1. *Communicate*: the server draws a seeded alignment subset of ``alignment_size`` public
   samples (5000, the configs' ``N_alignment``, capped at the public split; fresh every round
   as ``generate_alignment_data``) and sends only its seed and size (``query.fedmd_logits``;
   0 array bytes). Each client replies its logits on it (``N x C`` float32).
2. *Aggregate*: consensus ``f[n] = sum_k w[n, k] * logits[k, n]``, ``w`` from the weighting
   plug (uniform by default: the reference's plain mean of the logits).
3. *Digest* (``train.fedmd_digest``): fit the consensus on the alignment subset with
   :func:`fedkd.distill.logit_mae` -- mean absolute error between the client's pre-softmax
   logits and the consensus, averaged over samples *and* classes (Keras'
   ``mean_absolute_error``), no temperature, the consensus a detached constant -- with Adam
   ``digest_lr = 1e-3``, ``digest_batch_size = 256``, ``digest_epochs = 1``
   (``logits_matching_batchsize``, ``N_logits_matching_round``).
4. *Revisit*: cross-entropy (batch mean) on the private data with Adam ``lr = 1e-3``,
   ``revisit_batch_size = 5``, ``revisit_epochs = 2`` (``private_training_batchsize``,
   ``N_private_training_round`` of the (F)EMNIST-balanced config; the CIFAR configs use 4).

Which wins, FedMD's parameters or the scenario's ``clients.train``: FedMD's, for every step
they name. Each one set to ``null`` hands its knob back to ``clients.train``: ``lr: null``
trains the pre-training and revisit steps with the scenario's SGD (its lr, momentum, weight
decay), ``*_batch_size: null`` takes its batch size, ``revisit_epochs: null`` its epochs (or
steps); ``{lr: null, revisit_epochs: null, revisit_batch_size: null}`` makes the revisit the
scenario's own local training, as every other strategy runs it. The digest is always Adam.

Steps 1-3 happen in one runner round: :meth:`FedMD.configure_train` queries the logits with
``grid.send_and_receive`` on the accounting grid, so their bytes count in the round, and then
returns the digest messages. Accuracy is the mean test accuracy of the clients' private models
(``evaluate.private``, inherited from :class:`strategies.local.Local`), after the round's
revisit (the reference tests before each round's digest, so its round 0 is the pre-trained
model).

Where fedkd differs from the reference, and why:

- early stopping monitors a held-out part of the client's (or the public) *training* data,
  left out of that stage (the revisit uses all private data); the reference trains on all of
  it and monitors the private classes' *test* set, which would leak the test set here;
- rounds sample ``clients.fraction`` of the clients and pre-train them lazily (the reference
  runs every party every round, after pre-training them all);
- Adam's moments start afresh in every digest and revisit (the reference's compiled Keras
  models keep theirs across rounds): that state would triple what each client stores;
- the alignment subset is a uniform seeded draw, not stratified by the public labels, so the
  same code serves unlabeled public data; the reference models' dropout and their last
  layer's L2 penalty belong to its architectures, not to FedMD, and are not reproduced;
- the public split is a held-out part of the private task's own train set
  (``data.public.fraction``) or another dataset (``data.public.dataset``), where the paper
  pairs MNIST/FEMNIST and CIFAR-10/100 with disjoint class sets;
- the baseline: the paper compares each model with itself "trained on public then private
  data alone" (its round 0); ``local`` with the same ``pretrain_*_epochs`` starts from those
  models and then keeps training alone with ``clients.train`` (``scenarios/fedmd_paper.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
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
from fedkd.train import batch_indices, device_of, fit, predict
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import NodeInfo
from strategies.local import (
    PRIVATE_PRETRAIN,
    PUBLIC_PRETRAIN,
    Local,
    Pretrain,
    check_int,
    optimizer_for,
    stages_from,
    supervised,
    transfer_learning,
)
from strategies.weighting import (
    TeacherContext,
    Weighting,
    check_supported,
    check_weighting_split,
    make_weighting,
    sharpen_targets,
    update_students,
    uses_labels,
    weighting_split,
)

QUERY_TYPE = f"{MessageType.QUERY}.fedmd_logits"
DIGEST_TYPE = f"{MessageType.TRAIN}.fedmd_digest"

#: Round metrics of the clients pre-trained in a round (means over those clients).
PRETRAIN_KEYS = ("pretrain-public-epochs", "pretrain-private-epochs", "pretrain-private-val-acc")


# ----------------------------------------------------------------------------- shared helpers
def public_subset(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted seeded subset of ``min(size, n)`` indices of a public split of ``n`` samples.

    The server and every client call it with the same arguments, so only the seed travels.
    """
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def logits_record(logits: torch.Tensor) -> ArrayRecord:
    """An ``(N, C)`` float32 logits tensor as a one-array record."""
    return ArrayRecord({"logits": Array(logits.detach().cpu().to(torch.float32).numpy())})


def record_logits(record: ArrayRecord) -> torch.Tensor:
    """The inverse of :func:`logits_record`."""
    return torch.from_numpy(np.array(record["logits"].numpy(), dtype=np.float32))


def teacher_context(nodes: Sequence[NodeInfo]) -> TeacherContext:
    """What the handshake knows about the teachers ``nodes`` (sizes, label counts, ids)."""
    return TeacherContext(
        num_examples=torch.tensor([n.num_examples for n in nodes], dtype=torch.float64),
        label_counts=torch.tensor([list(n.label_counts) for n in nodes], dtype=torch.float64),
        cids=torch.tensor([n.cid for n in nodes]))


#: The reply record of a client's logits on the weighting split (label-using weightings).
SPLIT_LOGITS = "split-logits"


def peer_context(world: World | None, nodes: Sequence[NodeInfo], replies: Sequence[Message],
                 weighting: Weighting, truth: torch.Tensor | None) -> TeacherContext:
    """The context of peers that sent their logits: :func:`teacher_context`, the simulator's
    ``truth`` of the shared samples and, for a label-using ``weighting``, the logits each
    client sent on the weighting split (:func:`split_logits`) with the split's labels."""
    ctx = replace(teacher_context(nodes), truth=truth)
    if not uses_labels(weighting):
        return ctx
    split = None if world is None else weighting_split(world.data)[0]
    if split is None:
        raise ValueError("a label-using weighting needs bind(world) with a weighting split")
    return replace(ctx, val_labels=split.y, val_logits=torch.stack(
        [record_logits(r.content.array_records[SPLIT_LOGITS]) for r in replies]))


def split_logits(model: torch.nn.Module, env: ClientEnv) -> dict[str, ArrayRecord]:
    """The client's logits on the labeled weighting split, when the round's config asks
    (``weighting-split``): the split's inputs are shared like the public data, its labels
    stay with the server; the upload is counted like any other."""
    if not int(env.config.get("weighting-split", 0)):
        return {}
    split, _ = weighting_split(env.world.data)
    assert split is not None
    return {SPLIT_LOGITS: logits_record(predict(model, split.x))}


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
        What the server knows about the K clients; a per-client weighting (``kt_pfl``) is
        first updated with each client as the student, and the consensus then takes the
        mean of the present clients' coefficient rows.
    labels : torch.Tensor, optional
        Alignment labels, only when the public split is labeled.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        The ``(N, C)`` consensus and the ``(N, K)`` weights.
    """
    update_students(weighting, logits, ctx)
    weights = weighting(logits, ctx, labels)
    return sharpen_targets(weighting, weighted_logits(logits, weights), "logits"), weights


def check_positive(path: str, value: float) -> None:
    """Raise a ScenarioError unless ``value > 0``."""
    if not value > 0:
        raise ScenarioError(path, value, "a positive number")


def check_optional(path: str, value: float | None, integer: bool = True) -> None:
    """Raise a ScenarioError unless ``value`` is None (``clients.train``'s) or positive."""
    if value is None:
        return
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ScenarioError(path, value, "an integer >= 1, or null for clients.train's")
    elif isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ScenarioError(path, value, "a positive number, or null for clients.train's SGD")


def require_public(world: World, who: str) -> None:
    """Raise a ScenarioError if the world has no public split."""
    if world.data.public is None or len(world.data.public) == 0:
        raise ScenarioError("data.public.fraction", world.scenario.data.public.fraction,
                            f"a positive fraction or data.public.dataset ({who} needs a "
                            "public split)")


def pretrain_summary(replies: Sequence[Message]) -> dict[str, float]:
    """Round metrics from the query replies: how many clients pre-trained, and their means."""
    done = [m for r in replies for m in [r.content.metric_records.get("metrics")]
            if m is not None and int(m.get("pretrained", 0))]
    out: dict[str, float] = {"pretrained": float(len(done))}
    for key in PRETRAIN_KEYS:
        values = [float(m[key]) for m in done if not math.isnan(float(m[key]))]
        out[key] = float(np.mean(values)) if values else (math.nan if "acc" in key else 0.0)
    return out


# ----------------------------------------------------------------------------- strategy
class PublicSubset:
    """A seeded subset of the public split each round, drawn alike by the server and every
    client from its size and seed alone (FedMD's alignment set, DML's public batch)."""

    #: Salt of the subset's seed, one per strategy.
    subset_salt = 0
    seed: int
    world: World | None

    @property
    def subset_n(self) -> int:
        """Samples of each round's subset."""
        raise NotImplementedError

    def subset_seed(self, server_round: int) -> int:
        """Seed of this round's subset."""
        return seed_for(self.seed, server_round, self.subset_salt)

    def public_labels(self, server_round: int) -> torch.Tensor | None:
        """Labels of this round's subset if strategies may read them (a labeled public
        split), else None."""
        if self.world is None or not self.world.data.public_labeled:
            return None
        return self.public_truth(server_round)

    def public_truth(self, server_round: int) -> torch.Tensor | None:
        """The true labels of this round's subset, for the diagnostics and ``oracle`` only."""
        if self.world is None or self.world.data.public is None:
            return None
        index = public_subset(len(self.world.data.public), self.subset_n,
                              self.subset_seed(server_round))
        return self.world.data.public_truth_labels(torch.as_tensor(index))


@STRATEGIES.register("fedmd")
class FedMD(PublicSubset, Local):
    """FedMD: clients exchange logits on a public alignment subset and digest the consensus.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed
        Participation and seeding (from the scenario).
    alignment_size : int
        Public samples in each round's alignment subset (the reference's ``N_alignment``;
        capped at the public split's size).
    pretrain_public_epochs, pretrain_private_epochs : int
        Transfer learning: most epochs on the labeled public split (skipped if unlabeled),
        then on the private data; 0 skips a stage.
    pretrain_public_batch_size, pretrain_private_batch_size : int or None
        Their batch sizes (None: ``clients.train.batch_size``).
    pretrain_public_patience, pretrain_private_patience : int
        Their early-stopping patience in epochs.
    holdout_fraction : float
        Share of each stage's data held out (seeded) to monitor early stopping; 0 disables it.
    min_delta : float
        Least held-out accuracy gain that counts as an improvement.
    lr : float or None
        Adam's learning rate for pre-training and revisit (None: ``clients.train``'s SGD).
    digest_epochs, digest_batch_size : int
        Epochs and batch size fitting the consensus on the alignment subset.
    digest_lr : float
        Adam learning rate of the digest step.
    revisit_epochs : int or None
        Epochs on the private data after digesting each round (0: none; None:
        ``clients.train``'s epochs or steps).
    revisit_batch_size : int or None
        Its batch size (None: ``clients.train.batch_size``).
    weighting : str
        Weighting plug giving the consensus weights (``strategies/weighting.py``).
    weighting_params : dict, optional
        Its parameters.
    """

    train_type = DIGEST_TYPE
    subset_salt = 4242

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, alignment_size: int = 5000,
                 pretrain_public_epochs: int = 20, pretrain_public_batch_size: int | None = 128,
                 pretrain_public_patience: int = 3, pretrain_private_epochs: int = 25,
                 pretrain_private_batch_size: int | None = 32,
                 pretrain_private_patience: int = 10, holdout_fraction: float = 0.1,
                 min_delta: float = 0.001, lr: float | None = 1e-3, digest_epochs: int = 1,
                 digest_lr: float = 1e-3, digest_batch_size: int = 256,
                 revisit_epochs: int | None = 2, revisit_batch_size: int | None = 5,
                 weighting: str = "uniform",
                 weighting_params: dict[str, Any] | None = None) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         pretrain_public_epochs=pretrain_public_epochs,
                         pretrain_private_epochs=pretrain_private_epochs)
        p = "strategy.params."
        check_int(p + "alignment_size", alignment_size, 1)
        for name, value in (("pretrain_public_patience", pretrain_public_patience),
                            ("pretrain_private_patience", pretrain_private_patience),
                            ("digest_epochs", digest_epochs)):
            check_int(p + name, value, 0)
        check_int(p + "digest_batch_size", digest_batch_size, 1)
        for name, value in (("pretrain_public_batch_size", pretrain_public_batch_size),
                            ("pretrain_private_batch_size", pretrain_private_batch_size),
                            ("revisit_batch_size", revisit_batch_size)):
            check_optional(p + name, value)
        if revisit_epochs is not None:
            check_int(p + "revisit_epochs", revisit_epochs, 0)
        check_optional(p + "lr", lr, integer=False)
        check_positive(p + "digest_lr", digest_lr)
        if not 0.0 <= holdout_fraction < 1.0:
            raise ScenarioError(p + "holdout_fraction", holdout_fraction, "a number in [0, 1)")
        if not min_delta >= 0.0:
            raise ScenarioError(p + "min_delta", min_delta, "a number >= 0")
        shared = {"lr": lr, "min_delta": min_delta, "holdout_fraction": holdout_fraction}
        self.public_stage = Pretrain(pretrain_public_epochs, pretrain_public_batch_size,
                                     patience=pretrain_public_patience, **shared)
        self.private_stage = Pretrain(pretrain_private_epochs, pretrain_private_batch_size,
                                      patience=pretrain_private_patience, **shared)
        self.alignment_size = alignment_size
        self.lr = lr
        self.digest_epochs = digest_epochs
        self.digest_lr = digest_lr
        self.digest_batch_size = digest_batch_size
        self.revisit_epochs = revisit_epochs
        self.revisit_batch_size = revisit_batch_size
        self.weighting = weighting
        self.weighting_params = weighting_params
        self.weigh = make_weighting(weighting, weighting_params)
        self.pretrain_stats: dict[int, dict[str, float]] = {}

    def bind(self, world: World) -> None:
        """Bind the world; FedMD needs a public split (labeled for transfer learning)."""
        require_public(world, "fedmd")
        check_supported(self.weigh, self.weighting, "fedmd", per_client_targets=True)
        check_weighting_split(self.weigh, self.weighting, weighting_split(world.data)[0],
                              world.scenario.data.weight_fraction)
        super().bind(world)

    @property
    def alignment_n(self) -> int:
        """Samples of each round's alignment subset: ``alignment_size`` capped at the split."""
        if self.world is None or self.world.data.public is None:
            return self.alignment_size
        return min(self.alignment_size, len(self.world.data.public))

    @property
    def subset_n(self) -> int:
        """Samples of each round's subset: :attr:`alignment_n`."""
        return self.alignment_n

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """The round's train config plus FedMD's schedule and the subset seed (None as 0;
        ``revisit-epochs`` None as -1)."""
        return ConfigRecord({
            **dict(config), "server-round": server_round,
            "subset-seed": self.subset_seed(server_round), "subset-size": self.alignment_n,
            **self.public_stage.config("pretrain-public"),
            **self.private_stage.config("pretrain-private"),
            "digest-epochs": self.digest_epochs, "digest-lr": self.digest_lr,
            "digest-batch-size": self.digest_batch_size, "revisit-lr": self.lr or 0.0,
            "revisit-epochs": -1 if self.revisit_epochs is None else self.revisit_epochs,
            "revisit-batch-size": self.revisit_batch_size or 0,
            "weighting-split": int(uses_labels(self.weigh))})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Query the sampled clients' logits, form the consensus, return the digest messages."""
        if self.fraction_train == 0.0:
            return []
        nodes = self.sample(grid, server_round, self.fraction_train, self.min_train_nodes)
        cfg = self.round_config(server_round, config)
        replies = query_logits(grid, nodes, cfg, QUERY_TYPE, server_round)
        self.pretrain_stats[server_round] = pretrain_summary(replies)
        if not replies:
            return []
        answered = [self.node(r.metadata.src_node_id) for r in replies]
        logits = torch.stack([record_logits(r.content.array_records["logits"])
                              for r in replies])
        truth = self.public_truth(server_round)
        ctx = peer_context(self.world, answered, replies, self.weigh, truth)
        target, weights = consensus(logits, self.weigh, ctx, self.public_labels(server_round))
        self.teacher_log.record(server_round, [n.cid for n in answered], logits, weights,
                                truth, ensemble="logits", source="public")
        content = RecordDict({"consensus": logits_record(target), "config": cfg})
        return self.messages_to(content, answered, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The clients' mean losses plus the round's pre-training metrics."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        stats = self.pretrain_stats.pop(server_round, {})
        if metrics is None:
            return arrays, None
        return arrays, MetricRecord({**dict(metrics), **stats})


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


def pretrain(model: torch.nn.Module, env: ClientEnv) -> dict[str, float]:
    """FedMD phase 0 (:func:`strategies.local.transfer_learning`: the labeled public split,
    if any, then the private data, each until its held-out accuracy stalls); the reply's
    pre-training metrics."""
    public, private = transfer_learning(model, env, *stages_from(env.config, PUBLIC_PRETRAIN,
                                                                 PRIVATE_PRETRAIN))
    return {"pretrained": 1, "pretrain-public-epochs": public.epochs,
            "pretrain-private-epochs": private.epochs,
            "pretrain-private-val-acc": private.best_acc}


@client_fn(QUERY_TYPE)
def fedmd_logits(msg: Message, env: ClientEnv) -> RecordDict:
    """Reply this client's logits on the alignment subset (pre-training it on first call)."""
    model, existed = env.private_model()
    report: dict[str, float] = {"pretrained": 0, **dict.fromkeys(PRETRAIN_KEYS, 0.0)}
    if not existed:
        report = pretrain(model, env)
        env.save_private(model)
    logits = predict(model, alignment_inputs(env))
    return RecordDict({"logits": logits_record(logits), **split_logits(model, env),
                       "metrics": MetricRecord(report)})


def digest(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, epochs: int,
           lr: float, batch_size: int, seed: int) -> float:
    """Fit ``model``'s logits on ``x`` to ``target`` with :func:`logit_mae` and Adam."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    dev = device_of(model)
    target = target.to(dev)
    result = fit(model, opt, batch_indices(len(x), batch_size, gen, epochs=epochs),
                 lambda idx: logit_mae(model(x[idx].to(dev, non_blocking=True)),
                                       target[idx.to(dev)]))
    return result.loss


def revisit(model: torch.nn.Module, env: ClientEnv) -> float:
    """Cross-entropy on the private data: FedMD's schedule, ``clients.train`` where None."""
    cfg = env.train_config
    epochs = int(env.config["revisit-epochs"])
    if epochs == 0:
        return math.nan
    steps = cfg.steps if epochs < 0 else None
    gen = torch.Generator().manual_seed(env.seed())
    batches = batch_indices(len(env.data), int(env.config["revisit-batch-size"]) or
                            cfg.batch_size, gen, epochs=cfg.epochs if epochs < 0 else epochs,
                            steps=steps)
    opt = optimizer_for(model, float(env.config["revisit-lr"]) or None, cfg)
    return supervised(model, env.data.x, env.data.y, opt, batches).loss


@client_fn(DIGEST_TYPE)
def fedmd_digest(msg: Message, env: ClientEnv) -> RecordDict:
    """Digest the consensus on the alignment subset, then revisit the private data."""
    model, existed = env.private_model()
    if not existed:
        pretrain(model, env)
    target = record_logits(msg.content.array_records["consensus"])
    cfg = env.config
    digest_loss = digest(model, alignment_inputs(env), target, int(cfg["digest-epochs"]),
                         float(cfg["digest-lr"]), int(cfg["digest-batch-size"]), env.seed(12))
    loss = revisit(model, env)
    env.save_private(model)
    return RecordDict({"metrics": MetricRecord({"num-examples": len(env.data),
                                                "train-loss": loss,
                                                "digest-loss": digest_loss})})
