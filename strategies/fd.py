"""FD (FedDistill): federated distillation of per-class mean logits.

Jeong, Oh, Kim, Park, Bennis, Kim, "Communication-Efficient On-Device Machine Learning:
Federated Distillation and Augmentation under Non-IID Private Data", arXiv:1811.11479 (2018).
Reference code: PFLlib ``FD`` (``system/flcore/clients/clientfd.py`` and
``servers/serverfd.py``, called ``FedDistill``/``clientdistill.py`` before March 2025) and the
same files in HtFLlib.

No weights cross the network. Each round:

1. every sampled client trains its persistent private model (any architecture, kept in the
   state store as in :class:`strategies.local.Local`) with the scenario's local training on
   ``CE(z, y) + β · distance(z, g[y])``, where ``z`` are its logits and ``g[y]`` the global
   mean logits of the sample's class from the *previous* round (no term in round 1, nor for a
   class without global logits);
2. while training it sums its training-time logits per class and uploads their means, a
   ``C x C`` float32 array, with its samples per class (``C`` int64; 0 marks a class it did not
   see), as the ArrayRecord ``"logits"``;
3. the server averages the uploads per class over the clients that hold the class and sends
   the ``C x C`` result (and the summed counts) to the next round's clients in the same layout.

Loss conventions (pinned in ``tests/test_fd.py``):

- ``distance = "ce"`` (default): soft-label cross-entropy
  ``-sum_c softmax(g[y])_c log softmax(z)_c``, batch mean over the ``N`` rows (rows whose class
  has no global logits add 0), temperature 1, no ``T²`` factor: the paper's regulariser (its
  cross-entropy ``φ`` between softmax outputs, which it calls logit vectors), and PFLlib's and
  HtFLlib's loss from April 2024 (when they replaced their MSE) to November 2025. On the
  quickstart (10 rounds) it reaches 0.523 mean private-model accuracy against 0.448 for MSE.
- ``distance = "mse"``: ``F.mse_loss(z, t)``, the mean over all ``N x C`` entries, where a row
  whose class has no global logits is its own detached logits (it adds 0 but counts in the
  mean): PFLlib's and HtFLlib's FedDistill (``nn.MSELoss`` between raw logits) until April 2024.
- The target is a constant (detached); ``β = 1`` by default (PFLlib's ``--lamda``).
- Aggregation (``class_weights = "uniform"``): each client holding the class weighs 1, as the
  reference's ``proto_aggregation`` (a plain mean over the uploads that have the class);
  ``"counts"`` weighs each by its samples of the class. The global logits are replaced every
  round by the round's uploads, so a class no sampled client holds has no target next round.

Where fedkd differs: the paper's server sends device ``i`` the average of the *other* devices'
local averages (its own excluded) and averages softmax outputs; fedkd, as PFLlib, sends every
client the same average of logits (the ``"ce"`` distance takes the softmax of that average).
PFLlib's November 2025 code passes raw logits as soft targets to ``CrossEntropyLoss`` (not a
distribution); fedkd does not follow it. Federated augmentation (FAug, the paper's second part)
is not implemented. Accuracy is the mean test accuracy of the clients' private models
(``evaluate.private``, inherited from :class:`strategies.local.Local`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedkd.client import ClientEnv, client_fn
from fedkd.errors import ScenarioError
from fedkd.train import device_of, train_supervised
from strategies import STRATEGIES
from strategies.fedavg import NodeInfo
from strategies.local import Local

TRAIN_TYPE = f"{MessageType.TRAIN}.fd"
CLASS_WEIGHTS = ("uniform", "counts")


# ----------------------------------------------------------------------------- class means
class ClassStats:
    """Running per-class sums of vectors (logits or features) and how many were added.

    Parameters
    ----------
    num_classes : int
        ``C``.
    dim : int
        Width ``D`` of the vectors.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.seen = torch.zeros(num_classes, dtype=torch.int64)

    def add(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``(N, D)`` vectors with their ``(N,)`` labels (detached, moved to the CPU)."""
        labels = labels.cpu()
        self.sums.index_add_(0, labels, values.detach().cpu().to(torch.float64))
        self.seen += torch.bincount(labels, minlength=len(self.seen))

    def means(self) -> torch.Tensor:
        """``(C, D)`` float32 means; zero rows for classes never seen."""
        return (self.sums / self.seen.clamp(min=1).unsqueeze(1)).to(torch.float32)


def class_record(means: np.ndarray | torch.Tensor, counts: np.ndarray | torch.Tensor,
                 key: str) -> ArrayRecord:
    """The wire layout both ways: ``(C, D)`` float32 means as ``key`` and ``(C,)`` int64
    ``counts`` (0: no mean for that class)."""
    return ArrayRecord({key: Array(np.asarray(means, dtype=np.float32)),
                        "counts": Array(np.asarray(counts, dtype=np.int64))})


def read_class_record(record: ArrayRecord, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`class_record`: ``(C, D)`` float32 means and ``(C,)`` int64 counts."""
    means = torch.from_numpy(np.array(record[key].numpy(), dtype=np.float32))
    counts = torch.from_numpy(np.array(record["counts"].numpy(), dtype=np.int64))
    return means, counts


def aggregate_class_means(means: np.ndarray, counts: np.ndarray,
                          weighting: str = "uniform") -> tuple[np.ndarray, np.ndarray]:
    """Per-class average of K clients' class means over the clients that hold each class.

    Parameters
    ----------
    means : np.ndarray
        ``(K, C, D)`` class means of K clients.
    counts : np.ndarray
        ``(K, C)`` samples per class (0: the client has no mean for the class).
    weighting : str
        ``"uniform"``: every holder weighs 1 (the reference); ``"counts"``: holders weigh by
        their samples of the class.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(C, D)`` float32 global means (zero rows where no client holds the class) and the
        ``(C,)`` int64 summed counts (0 exactly there).
    """
    counts = np.asarray(counts, dtype=np.int64)
    held = counts > 0
    w = (counts if weighting == "counts" else held).astype(np.float64)
    total = w.sum(axis=0)
    acc = np.einsum("kc,kcd->cd", w, np.asarray(means, dtype=np.float64))
    out = np.where(total[:, None] > 0, acc / np.maximum(total, 1e-300)[:, None], 0.0)
    return out.astype(np.float32), counts.sum(axis=0)


def class_targets(values: torch.Tensor, means: torch.Tensor, has: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's target ``means[y]`` and whether it has one; a row without one gets its own
    detached values (the reference's convention)."""
    mask = has[labels]
    target = torch.where(mask.unsqueeze(1), means.detach()[labels].to(values.dtype),
                         values.detach())
    return target, mask


def class_mse(values: torch.Tensor, means: torch.Tensor, has: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
    """``mean((values - means[y])²)`` over all ``N x D`` entries; rows whose class has no
    mean add 0 (FD's logit distance and FedProto's prototype distance)."""
    target, _ = class_targets(values, means, has, labels)
    return F.mse_loss(values, target)


def class_soft_ce(logits: torch.Tensor, means: torch.Tensor, has: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """``-sum_c softmax(means[y])_c log softmax(logits)_c``, mean over the N rows; rows whose
    class has no mean add 0."""
    target, mask = class_targets(logits, means, has, labels)
    ce = -(F.softmax(target, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1)
    return torch.where(mask, ce, torch.zeros_like(ce)).mean()


DISTANCES: dict[str, Callable[..., torch.Tensor]] = {"ce": class_soft_ce, "mse": class_mse}


# ----------------------------------------------------------------------------- server
class ClassMeanExchange(Local):
    """Server half of FD and FedProto: clients upload per-class means, the server averages them
    per class and sends the result to the next round's clients.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed
        As :class:`strategies.fedavg.FedAvg`.
    class_weights : str
        ``"uniform"`` (every client holding a class weighs 1) or ``"counts"``.
    """

    #: Name of the ArrayRecord holding the means in replies and train messages.
    payload = "means"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0,
                 class_weights: str = "uniform") -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed)
        if class_weights not in CLASS_WEIGHTS:
            raise ScenarioError("strategy.params.class_weights", class_weights,
                                " or ".join(CLASS_WEIGHTS))
        self.class_weights = class_weights
        self.global_means: np.ndarray | None = None
        self.global_counts: np.ndarray | None = None

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """One shared message: the config and, from round 2 on, the global class means."""
        cfg = ConfigRecord({**dict(config), "server-round": server_round,
                            **self.client_config(server_round)})
        content = RecordDict({"config": cfg})
        if self.global_means is not None and self.global_counts is not None:
            content[self.payload] = class_record(self.global_means, self.global_counts,
                                                 self.payload)
        return self.messages_to(content, nodes, server_round)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the uploaded class means per class; no global model."""
        ok = self.split_replies(server_round, replies)
        if not ok:
            return None, None
        uploads = [read_class_record(r.content.array_records[self.payload], self.payload)
                   for r in ok]
        self.global_means, self.global_counts = aggregate_class_means(
            np.stack([m.numpy() for m, _ in uploads]), np.stack([c.numpy() for _, c in uploads]),
            self.class_weights)
        metrics = self.train_metrics(ok)
        metrics["global-classes"] = int((self.global_counts > 0).sum())
        return None, metrics


@STRATEGIES.register("fd")
class FD(ClassMeanExchange):
    """Federated distillation: private models regularised towards global per-class logits.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, class_weights
        As :class:`ClassMeanExchange`.
    beta : float
        Weight ``β`` of the distillation term (0: training alone, as ``local``).
    distance : str
        ``"ce"``, soft-label cross-entropy (default), or ``"mse"`` between logits.
    """

    train_type = TRAIN_TYPE
    payload = "logits"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, class_weights: str = "uniform",
                 beta: float = 1.0, distance: str = "ce") -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         class_weights=class_weights)
        if not beta >= 0:
            raise ScenarioError("strategy.params.beta", beta, "a number >= 0")
        if distance not in DISTANCES:
            raise ScenarioError("strategy.params.distance", distance, " or ".join(DISTANCES))
        self.beta = beta
        self.distance = distance

    def client_config(self, server_round: int) -> dict[str, Any]:
        """``fd-beta`` and ``fd-distance`` for the clients."""
        return {"fd-beta": float(self.beta), "fd-distance": self.distance}


# ----------------------------------------------------------------------------- client side
def received_means(msg: Message, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The global ``(C, D)`` means and ``(C,)`` has-a-mean mask of a train message, if any."""
    if key not in msg.content.array_records:
        return None
    means, counts = read_class_record(msg.content.array_records[key], key)
    return means, counts > 0


def class_counts_seen(labels: torch.Tensor, stats: ClassStats) -> torch.Tensor:
    """Samples per class of a client's data, 0 for classes it produced no vector of."""
    counts = torch.bincount(labels.cpu(), minlength=len(stats.seen))
    return torch.where(stats.seen > 0, counts, torch.zeros_like(counts))


@client_fn(TRAIN_TYPE)
def train_fd(msg: Message, env: ClientEnv) -> RecordDict:
    """Train the private model on ``CE + β · distance(logits, global[y])``; upload its
    per-class mean training logits."""
    model, _ = env.private_model()
    data = env.data
    num_classes = env.world.data.num_classes
    beta = float(env.config["fd-beta"])
    distance = DISTANCES[str(env.config["fd-distance"])]
    target = received_means(msg, "logits")
    dev = device_of(model)
    means, has = (t.to(dev) for t in target) if target is not None else (None, None)
    stats = ClassStats(num_classes, num_classes)
    term = {"sum": 0.0}

    def extra(idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        labels = data.y[idx].to(dev)
        stats.add(logits, labels)
        if means is None:
            return logits.new_zeros(())
        dist = distance(logits, means, has, labels)
        term["sum"] += float(dist.detach()) * len(idx)
        return beta * dist if beta > 0 else logits.new_zeros(())

    result = train_supervised(model, data.x, data.y, env.train_config, seed=env.seed(),
                              extra_loss=extra)
    env.save_private(model)
    return RecordDict({
        "logits": class_record(stats.means(), class_counts_seen(data.y, stats), "logits"),
        "metrics": MetricRecord({"num-examples": len(data), "train-loss": result.loss,
                                 "distill-loss": term["sum"] / max(result.examples, 1)}),
    })
