"""FedNTD: Preservation of the Global Knowledge by Not-True Distillation in Federated Learning.

Lee, Jeong, Shin, Yun, NeurIPS 2022 (reference code: Lee-Gihun/FedNTD,
``algorithms/fedntd``).

The server is FedAvg. Each client trains on ``CE(student, y) + β · L_NTD`` where ``L_NTD``
distils the received global model's predictions on the *not-true* classes only: both the
local and the global logits lose each sample's true-class column before the softmax, so the
client keeps the global model's knowledge of the classes it does not hold without being
pulled away from its own labels.

Loss conventions (pinned in ``tests/test_fedntd.py``), as the reference's ``NTD_Loss``:

- direction ``KL(global ‖ local)`` on the not-true softmaxes at temperature ``τ``;
- reduction ``batchmean``; no ``τ²`` factor;
- the global model is frozen (no gradient) and evaluated on the same batch;
- defaults ``τ = 1``, ``β = 1`` (the reference's paper configuration, ``config/fedntd.json``).

Where fedkd differs: the frozen global model runs in eval mode (the reference copies the
model without switching its mode; the two agree for models without BatchNorm or dropout).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from flwr.app import MessageType, RecordDict

from fedkd.client import ClientEnv, client_fn, train_and_reply
from fedkd.distill import not_true_kl
from fedkd.errors import ScenarioError
from strategies import STRATEGIES
from strategies.fedavg import FedAvg

TRAIN_TYPE = f"{MessageType.TRAIN}.fedntd"


@STRATEGIES.register("fedntd")
class FedNTD(FedAvg):
    """FedAvg whose clients add not-true distillation from the global model.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As :class:`strategies.fedavg.FedAvg`.
    beta : float
        Weight ``β`` of the not-true distillation term (0: FedAvg).
    tau : float
        Temperature ``τ`` of both not-true softmaxes.
    """

    train_type = TRAIN_TYPE

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 beta: float = 1.0, tau: float = 1.0) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        if beta < 0:
            raise ScenarioError("strategy.params.beta", beta, "a number >= 0")
        if tau <= 0:
            raise ScenarioError("strategy.params.tau", tau, "a number > 0")
        self.beta = beta
        self.tau = tau

    def client_config(self, server_round: int) -> dict[str, Any]:
        """``ntd-beta`` and ``ntd-tau`` for the clients."""
        return {"ntd-beta": float(self.beta), "ntd-tau": float(self.tau)}


@client_fn(TRAIN_TYPE)
def train_ntd(msg: Any, env: ClientEnv) -> RecordDict:
    """Local SGD on ``CE + β · KL_not-true(global ‖ local)``; send the weights back."""
    model = env.model_from(msg.content.array_records["arrays"])
    beta, tau = float(env.config["ntd-beta"]), float(env.config["ntd-tau"])
    data = env.data
    extra = None
    if beta > 0:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        dev = next(model.parameters()).device

        def extra(idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                global_logits = frozen(data.x[idx].to(dev))
            return beta * not_true_kl(logits, global_logits, data.y[idx].to(dev), tau)

    return train_and_reply(model, env, extra)
