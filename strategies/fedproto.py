"""FedProto: Federated Prototype Learning across Heterogeneous Clients.

Tan, Long, Liu, Zhou, Lu, Jiang, Zhang, AAAI 2022. Reference code: ``yuetan031/fedproto``
(``lib/update.py: update_weights_het``, ``lib/utils.py: agg_func, proto_aggregation``) and the
``FedProto`` of PFLlib and HtFLlib (``system/flcore/{clients/clientproto.py,
servers/serverproto.py}``).

No weights cross the network, only class *prototypes*: the mean latent feature
``model.features(x)`` of each class (every fedkd model is a :class:`fedkd.models.FedModel`,
``forward(x) = head(features(x))``). Each round:

1. every sampled client trains its persistent private model (kept in the state store, as in
   :class:`strategies.local.Local`) with the scenario's local training on
   ``CE(head(f), y) + λ · MSE(f, p[y])``, ``f = features(x)``, where ``p[y]`` is the global
   prototype of the sample's class from the previous round (no term in round 1, nor for a
   class without a global prototype);
2. it uploads the per-class means of its training-time features, a ``C x d`` float32 array
   (``d = latent_dim``), with its samples per class (``C`` int64; 0: no prototype), as the
   ArrayRecord ``"protos"``;
3. the server averages the prototypes per class over the clients that hold the class and sends
   the ``C x d`` result to the next round's clients in the same layout.

Loss conventions (pinned in ``tests/test_fedproto.py``), as the reference: ``nn.MSELoss()``
between the features and the prototypes, the mean over all ``N x d`` entries, where a row whose
class has no global prototype is its own detached features (adds 0, counts in the mean); the
prototypes are constants; ``λ = 1`` by default (``--ld 1`` in yuetan031/fedproto, ``--lamda
1`` in PFLlib/HtFLlib; the parameter is spelled ``lamda`` because ``lambda`` is a Python
keyword). Aggregation (``class_weights = "uniform"``): every client holding the class weighs 1,
as the reference's ``proto_aggregation``; ``class_weights = "counts"`` weighs each holder by
its samples of the class instead. A client's prototype averages its features over all local steps
of the round (PFLlib/HtFLlib; yuetan031 keeps only the last epoch's).

Heterogeneous models: prototypes of different clients are averaged, so every architecture must
have the same ``latent_dim``; :meth:`FedProto.bind` raises a ScenarioError naming
``clients.models`` otherwise. HtFLlib gets equal widths by replacing each backbone's classifier
with ``nn.AdaptiveAvgPool1d(feature_dim)`` (one ``--feature_dim``, 512 by default) before a new
linear head; fedkd does not reshape models and requires equal ``latent_dim`` (e.g. ``mlp`` with
``hidden: [..., 128]`` next to ``cnn_small``).

Evaluation: the reference reports accuracy both by the nearest global prototype (MSE distance
of ``features(x)``) and by the local head. fedkd's accuracy is the mean test accuracy of the
clients' private models through their heads (``evaluate.private``, inherited from
:class:`strategies.local.Local`); nearest-prototype inference is not implemented.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedkd.client import ClientEnv, client_fn
from fedkd.errors import ScenarioError
from fedkd.models import one_latent_dim
from fedkd.train import batch_indices, device_of, fit, sgd
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fd import (
    ClassMeanExchange,
    ClassStats,
    class_counts_seen,
    class_mse,
    class_record,
    received_means,
)

TRAIN_TYPE = f"{MessageType.TRAIN}.fedproto"


def check_latent_dims(dims: dict[str, int]) -> int:
    """The one latent width of all architecture groups (:func:`fedkd.models.one_latent_dim`)."""
    return one_latent_dim(dims, "FedProto averages feature prototypes across clients")


@STRATEGIES.register("fedproto")
class FedProto(ClassMeanExchange):
    """Prototype learning: private models pull their features towards global class prototypes.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, class_weights
        As :class:`strategies.fd.ClassMeanExchange`.
    lamda : float
        Weight ``λ`` of the prototype term (0: training alone, as ``local``).
    """

    train_type = TRAIN_TYPE
    payload = "protos"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, class_weights: str = "uniform",
                 lamda: float = 1.0) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         class_weights=class_weights)
        if not lamda >= 0:
            raise ScenarioError("strategy.params.lamda", lamda, "a number >= 0")
        self.lamda = lamda

    def bind(self, world: World) -> None:
        """Bind the world; every architecture must share one latent width."""
        check_latent_dims({arch: int(world.new_model(arch, seed=0).latent_dim)
                           for arch in world.groups})
        super().bind(world)

    def client_config(self, server_round: int) -> dict[str, Any]:
        """``proto-lamda`` for the clients."""
        return {"proto-lamda": float(self.lamda)}


@client_fn(TRAIN_TYPE)
def train_fedproto(msg: Message, env: ClientEnv) -> RecordDict:
    """Train the private model on ``CE + λ · MSE(features, prototype[y])``; upload its per-class
    mean training features."""
    model, _ = env.private_model()
    data, cfg = env.data, env.train_config
    lamda = float(env.config["proto-lamda"])
    dev = device_of(model)
    target = received_means(msg, "protos")
    if target is not None and target[0].shape[1] != model.latent_dim:
        raise ValueError(f"prototypes of width {target[0].shape[1]} for a model with "
                         f"latent_dim {model.latent_dim}")
    means, has = (t.to(dev) for t in target) if target is not None else (None, None)
    stats = ClassStats(env.world.data.num_classes, model.latent_dim)
    term = {"sum": 0.0}

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        labels = data.y[idx].to(dev, non_blocking=True)
        feats = model.features(data.x[idx].to(dev, non_blocking=True))
        loss = F.cross_entropy(model.head(feats), labels)
        stats.add(feats, labels)
        if means is not None:
            dist = class_mse(feats, means, has, labels)
            term["sum"] += float(dist.detach()) * len(idx)
            if lamda > 0:
                loss = loss + lamda * dist
        return loss

    gen = torch.Generator().manual_seed(env.seed())
    batches = batch_indices(len(data.y), cfg.batch_size, gen, epochs=cfg.epochs, steps=cfg.steps)
    result = fit(model, sgd(model, cfg), batches, step_loss)
    env.save_private(model)
    return RecordDict({
        "protos": class_record(stats.means(), class_counts_seen(data.y, stats), "protos"),
        "metrics": MetricRecord({"num-examples": len(data), "train-loss": result.loss,
                                 "proto-loss": term["sum"] / max(result.examples, 1)}),
    })
