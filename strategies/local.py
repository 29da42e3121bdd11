"""Training alone: every client trains its own persistent model on its private data.

Nothing but metrics crosses the network. It is the baseline that FedMD (Li & Wang 2019) and
deep mutual learning (Zhang et al. CVPR 2018) are measured against ("each client's accuracy
vs training alone"), and the base class of strategies whose clients keep private models:
they have no global model, so accuracy is the mean of the clients' own models on the test
set (``evaluate.private``), reported every ``eval_every`` rounds.

Transfer learning: FedMD's paper measures each client against its model "trained on public
then private data alone" -- FedMD's own phase 0. With ``pretrain_public_epochs`` and
``pretrain_private_epochs`` (both 0, plain training alone, by default), the first time a
client is sampled its fresh model runs that phase exactly as FedMD does, with the same seeds,
so both strategies start from identical models (:func:`transfer_learning`): at most that many
epochs on the labeled public split (:data:`PUBLIC_PRETRAIN`: Adam 1e-3, batch 128, patience
3), then on its own data (:data:`PRIVATE_PRETRAIN`: Adam 1e-3, batch 32, patience 10), each
stopped early on the accuracy of a seeded held-out 10% of the stage's data. Then it trains
alone as usual (``clients.train``). On an unlabeled public split the public stage is skipped
(a warning says so).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
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
from flwr.serverapp import Grid

from fedkd.client import ClientEnv, client_fn, seed_for
from fedkd.errors import ScenarioError
from fedkd.scenario import TrainConfig
from fedkd.train import (
    FitResult,
    batch_indices,
    device_of,
    evaluate,
    fit,
    sgd,
    train_supervised,
)
from fedkd.world import World, local_summary
from strategies import STRATEGIES
from strategies.fedavg import FedAvg, NodeInfo

LOG = logging.getLogger("fedkd")


@STRATEGIES.register("local")
class Local(FedAvg):
    """Clients train private models alone; the server only samples and evaluates them.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        Participation and seeding (from the scenario), as :class:`strategies.fedavg.FedAvg`.
    pretrain_public_epochs : int
        Transfer learning on the labeled public split before a client's first round: at most
        this many epochs, early-stopped (:data:`PUBLIC_PRETRAIN`); 0 (the default) skips it.
    pretrain_private_epochs : int
        Then at most this many early-stopped epochs on the client's data
        (:data:`PRIVATE_PRETRAIN`); 0 (the default) skips it.
    """

    train_type = f"{MessageType.TRAIN}.local"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 pretrain_public_epochs: int = 0, pretrain_private_epochs: int = 0) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        check_int("strategy.params.pretrain_public_epochs", pretrain_public_epochs, 0)
        check_int("strategy.params.pretrain_private_epochs", pretrain_private_epochs, 0)
        self.pretrain_public_epochs = pretrain_public_epochs
        self.pretrain_private_epochs = pretrain_private_epochs

    def bind(self, world: World) -> None:
        """Bind the world; warn when public pre-training is asked for but cannot run."""
        if self.pretrain_public_epochs > 0 and not public_is_labeled(world):
            LOG.warning("%s: no labeled public split (data.public.labeled is false): "
                        "transfer learning on public data is skipped", type(self).__name__)
        super().bind(world)

    def initial_arrays(self, world: World) -> ArrayRecord:
        """No global model."""
        return ArrayRecord()

    def client_config(self, server_round: int) -> dict[str, Any]:
        """The transfer-learning epochs when it is on."""
        if self.pretrain_public_epochs <= 0 and self.pretrain_private_epochs <= 0:
            return {}
        return {"pretrain-public-epochs": self.pretrain_public_epochs,
                "pretrain-private-epochs": self.pretrain_private_epochs}

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """A config-only message per sampled client."""
        content = RecordDict({"config": ConfigRecord({**dict(config),
                                                      "server-round": server_round,
                                                      **self.client_config(server_round)})})
        return self.messages_to(content, nodes, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Nothing to aggregate but the train loss."""
        ok = self.split_replies(server_round, replies)
        if not ok:
            return None, None
        return None, self.train_metrics(ok)

    def evaluates(self, server_round: int) -> bool:
        """Whether the clients' private models are evaluated after this round."""
        if self.world is None:
            return True
        scn = self.world.scenario
        return server_round % scn.eval_every == 0 or server_round == scn.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every client evaluates its private model on the test set."""
        if not self.evaluates(server_round):
            return []
        content = RecordDict({"config": ConfigRecord({**dict(config), "seed": self.seed,
                                                      "server-round": server_round,
                                                      **self.private_eval_config()})})
        return [Message(content, dst_node_id=n.node_id,
                        message_type=f"{MessageType.EVALUATE}.private",
                        group_id=str(server_round)) for n in self.discover(grid)]

    def private_eval_config(self) -> dict[str, Any]:
        """Extra config entries of the ``evaluate.private`` messages (none here)."""
        return {}

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """Unweighted means over clients of their private models' scores.

        ``acc``/``acc-min``/``loss`` on the global test set; with local test splits
        (``data.local_test_fraction > 0``) also ``local-acc``, ``local-acc-worst10``,
        ``local-acc-std`` and ``local-loss`` on each client's own split
        (:func:`private_local_metrics`).
        """
        metrics = [r.content.metric_records["metrics"] for r in replies if not r.has_error()]
        if not metrics:
            return None
        accs = [float(m["eval-acc"]) for m in metrics]
        return MetricRecord({"acc": float(np.mean(accs)), "acc-min": float(np.min(accs)),
                             "loss": float(np.mean([float(m["eval-loss"]) for m in metrics])),
                             **private_local_metrics(metrics)})


def private_local_metrics(metrics: Sequence[MetricRecord]) -> dict[str, float]:
    """Personalised metrics of ``evaluate.private`` replies' ``local-acc``/``local-loss``
    (:func:`fedkd.world.local_summary`); clients without a local test split are left out."""
    local = [m for m in metrics if "local-acc" in m]
    return local_summary([float(m["local-acc"]) for m in local],  # type: ignore[arg-type]
                         [float(m["local-loss"]) for m in local])  # type: ignore[arg-type]


@client_fn("train.local")
def train_local(msg: Message, env: ClientEnv) -> RecordDict:
    """Train the private model on private data and keep it (after transfer learning, the
    first time, when ``pretrain-*-epochs`` are set)."""
    model, existed = env.private_model()
    extra: dict[str, float] = {}
    if "pretrain-public-epochs" in env.config:
        public = private = StageResult(0, math.nan)
        if not existed:
            stages = stages_from(env.config, replace(PUBLIC_PRETRAIN, epochs=0),
                                 replace(PRIVATE_PRETRAIN, epochs=0))
            public, private = transfer_learning(model, env, *stages)
        extra = {"pretrain-public-epochs": public.epochs,
                 "pretrain-private-epochs": private.epochs}
    result = train_supervised(model, env.data.x, env.data.y, env.train_config, seed=env.seed())
    env.save_private(model)
    return RecordDict({"metrics": MetricRecord({"num-examples": len(env.data),
                                                "train-loss": result.loss, **extra})})


# ----------------------------------------------------------------------------- transfer learning
def check_int(path: str, value: int, minimum: int) -> None:
    """Raise a ScenarioError unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScenarioError(path, value, f"an integer >= {minimum}")


def public_is_labeled(world: World) -> bool:
    """Whether the world has a non-empty public split whose labels strategies may read."""
    pub = world.data.public
    return pub is not None and len(pub) > 0 and world.data.public_labeled


@dataclass(frozen=True)
class Pretrain:
    """One transfer-learning stage: supervised epochs until the held-out accuracy stalls.

    Attributes
    ----------
    epochs : int
        Most epochs (0 skips the stage).
    batch_size : int or None
        Batch size; None takes ``clients.train.batch_size``.
    lr : float or None
        Adam's learning rate; None trains with the scenario's SGD (``clients.train``).
    patience : int
        Epochs without improvement before stopping (Keras' ``EarlyStopping(patience)``).
    min_delta : float
        Least gain of held-out accuracy that counts as an improvement.
    holdout_fraction : float
        Share of the stage's data held out (seeded) to monitor; 0 runs every epoch.
    """

    epochs: int
    batch_size: int | None = 128
    lr: float | None = 1e-3
    patience: int = 3
    min_delta: float = 0.001
    holdout_fraction: float = 0.1

    def config(self, prefix: str) -> dict[str, int | float]:
        """The stage as config entries ``<prefix>-<field>`` (None sent as 0)."""
        return {f"{prefix}-{f.name.replace('_', '-')}": getattr(self, f.name) or 0
                for f in fields(self)}

    @classmethod
    def from_config(cls, config: ConfigRecord, prefix: str, default: Pretrain) -> Pretrain:
        """The stage :meth:`config` wrote; entries it lacks come from ``default``."""

        def get(name: str) -> Any:
            key = f"{prefix}-{name.replace('_', '-')}"
            return config[key] if key in config else getattr(default, name)

        return cls(epochs=int(get("epochs")), batch_size=int(get("batch_size") or 0) or None,
                   lr=float(get("lr") or 0.0) or None, patience=int(get("patience")),
                   min_delta=float(get("min_delta")),
                   holdout_fraction=float(get("holdout_fraction")))


#: Public transfer learning as FedMD's reference code runs it (``train_models`` with its
#: ``pre_train_params``): Adam 1e-3, batch 128, at most 20 epochs, patience 3, min_delta 0.001.
PUBLIC_PRETRAIN = Pretrain(epochs=20, batch_size=128, lr=1e-3, patience=3)

#: Private transfer learning as the reference's ``FedMD.__init__``: Adam 1e-3, batch 32, at
#: most 25 epochs, ``EarlyStopping(min_delta=0.001, patience=10)``.
PRIVATE_PRETRAIN = Pretrain(epochs=25, batch_size=32, lr=1e-3, patience=10)


def stages_from(config: ConfigRecord, public: Pretrain,
                private: Pretrain) -> tuple[Pretrain, Pretrain]:
    """The public and private stages a config describes (``public``/``private`` fill gaps)."""
    return (Pretrain.from_config(config, "pretrain-public", public),
            Pretrain.from_config(config, "pretrain-private", private))


@dataclass(frozen=True)
class StageResult:
    """What a pre-training stage did: epochs run and the best held-out accuracy (NaN: none)."""

    epochs: int
    best_acc: float


@dataclass
class EarlyStopping:
    """Keras' ``EarlyStopping(monitor="val_acc", mode="max")``, weights not restored.

    A score improves when ``score - min_delta > best``; training stops once ``patience``
    epochs in a row did not improve (with the best at epoch ``b``: after epoch ``b + patience``).
    """

    patience: int
    min_delta: float = 0.0
    best: float = -math.inf
    wait: int = 0

    def stop(self, score: float) -> bool:
        """Record an epoch's held-out score; whether training stops now."""
        if score - self.min_delta > self.best:
            self.best, self.wait = score, 0
            return False
        self.wait += 1
        return self.wait >= self.patience


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded sorted ``(train, held_out)`` indices of ``range(n)``.

    The held-out part takes ``round(fraction * n)`` samples, at least one when ``fraction > 0``
    and never all of them (none when ``n < 2``).
    """
    k = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def optimizer_for(model: torch.nn.Module, lr: float | None,
                  cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam at ``lr``, or the scenario's SGD (``clients.train``) when ``lr`` is None."""
    return sgd(model, cfg) if lr is None else torch.optim.Adam(model.parameters(), lr=lr)


def supervised(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, batches: Iterator[torch.Tensor]) -> FitResult:
    """Cross-entropy steps on ``(x, y)`` over index ``batches`` with any optimizer.

    The same steps as :func:`fedkd.train.train_supervised`, which is bound to SGD; batches
    move to the model's device.
    """
    dev = device_of(model)
    return fit(model, optimizer, batches, lambda idx: F.cross_entropy(
        model(x[idx].to(dev, non_blocking=True)), y[idx].to(dev, non_blocking=True)))


def fit_early_stopping(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       stage: Pretrain, cfg: TrainConfig, seed: int) -> StageResult:
    """Train on ``(x, y)`` minus a seeded held-out part, one epoch at a time, until
    :class:`EarlyStopping` on the held-out accuracy stops it or ``stage.epochs`` ran."""
    if stage.epochs <= 0:
        return StageResult(0, math.nan)
    train_idx, held_idx = holdout_split(len(y), stage.holdout_fraction, seed)
    x_train, y_train = x[train_idx], y[train_idx]
    opt = optimizer_for(model, stage.lr, cfg)
    gen = torch.Generator().manual_seed(seed)
    stopper = EarlyStopping(stage.patience, stage.min_delta)
    batch_size = stage.batch_size or cfg.batch_size
    for epoch in range(1, stage.epochs + 1):
        supervised(model, x_train, y_train, opt, batch_indices(len(y_train), batch_size, gen))
        if len(held_idx) and stopper.stop(evaluate(model, x[held_idx], y[held_idx])[1]):
            return StageResult(epoch, stopper.best)
    return StageResult(stage.epochs, stopper.best if stopper.best > -math.inf else math.nan)


def pretrain_seed(env: ClientEnv, purpose: int) -> int:
    """Seed of a pre-training stage: scenario seed, client and purpose, not the round."""
    return seed_for(int(env.config.get("seed", 0)), env.cid, purpose)


def pretrain_public(model: torch.nn.Module, env: ClientEnv, stage: Pretrain) -> StageResult:
    """Transfer learning on the labeled public split (0 epochs when it is unlabeled)."""
    if stage.epochs <= 0 or not public_is_labeled(env.world):
        return StageResult(0, math.nan)
    pub = env.world.data.public
    return fit_early_stopping(model, pub.x, pub.y, stage, env.train_config,
                              pretrain_seed(env, 31))


def transfer_learning(model: torch.nn.Module, env: ClientEnv, public: Pretrain,
                      private: Pretrain) -> tuple[StageResult, StageResult]:
    """FedMD's phase 0: the labeled public split (if any), then the client's own data, each
    until its held-out accuracy stalls."""
    done = pretrain_public(model, env, public)
    return done, fit_early_stopping(model, env.data.x, env.data.y, private, env.train_config,
                                    pretrain_seed(env, 32))
