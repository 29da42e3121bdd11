"""FedGKD: global knowledge distillation from an ensemble of recent global models.

Yao, Wang, Liu, Li, Xie, Zhou, Lu, Yu, Zhang, "FedGKD: Towards Heterogeneous Federated
Learning via Global Knowledge Distillation", IEEE Transactions on Computers 2023 (the
authors' code builds on epfml's federated-learning code: ``MasterFedGKD``/``WorkerFedGKD``).

The server is FedAvg and keeps the last ``buffer_length`` global models (the one each round
starts from included). Their parameter average is the *teacher*, sent beside the global model
(so FedGKD downloads two models per client when ``buffer_length > 1``; with 1 the teacher is
the received global model itself and nothing extra is sent). Each client trains on
``CE + γ · T² · KL(softmax(teacher/T) ‖ softmax(local/T))`` from round 2 on.

Loss conventions (pinned in ``tests/test_fedgkd.py``), as the authors' ``_divergence``:
forward ``KL(teacher ‖ local)``, ``batchmean``, multiplied by ``T²``; the teacher is frozen;
no distillation in round 1 (the teacher would be the initial model). The paper writes the
coefficient as ``γ/2``; fedkd's ``gamma`` multiplies the term directly, as the code does.
Defaults: ``gamma = 0.2``, ``temperature = 1``, ``buffer_length = 5`` (the paper's ``M``).
FedGKD-VOTE (buffer weights from validation losses) is not implemented.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedkd.client import ClientEnv, client_fn, train_and_reply
from fedkd.comm import arrayrecord_to_state_dict
from fedkd.distill import kd_kl
from fedkd.errors import ScenarioError
from strategies import STRATEGIES
from strategies.fedavg import FedAvg, NodeInfo, weighted_average

TRAIN_TYPE = f"{MessageType.TRAIN}.fedgkd"


@STRATEGIES.register("fedgkd")
class FedGKD(FedAvg):
    """FedAvg whose clients distil from the average of the last global models.

    Parameters
    ----------
    fraction_train, min_train_nodes, min_available_nodes, seed, fraction_evaluate
        As :class:`strategies.fedavg.FedAvg`.
    gamma : float
        Weight ``γ`` of the distillation term (0: FedAvg).
    temperature : float
        Distillation temperature ``T``.
    buffer_length : int
        Global models averaged into the teacher (``M``; 1: the received model is the teacher).
    """

    train_type = TRAIN_TYPE

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 1,
                 min_available_nodes: int = 1, seed: int = 0, fraction_evaluate: float = 0.0,
                 gamma: float = 0.2, temperature: float = 1.0, buffer_length: int = 5) -> None:
        super().__init__(fraction_train=fraction_train, min_train_nodes=min_train_nodes,
                         min_available_nodes=min_available_nodes, seed=seed,
                         fraction_evaluate=fraction_evaluate)
        for name, value, ok, allowed in (("gamma", gamma, gamma >= 0, "a number >= 0"),
                                         ("temperature", temperature, temperature > 0,
                                          "a number > 0"),
                                         ("buffer_length", buffer_length, buffer_length >= 1,
                                          "an integer >= 1")):
            if not ok:
                raise ScenarioError(f"strategy.params.{name}", value, allowed)
        self.gamma = gamma
        self.temperature = temperature
        self.buffer_length = buffer_length
        self.buffer: list[dict[str, ArrayRecord]] = []  # the last global models, per group

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """Put the round's global model (``self.current``) in the buffer, then as FedAvg."""
        self.buffer = [*self.buffer, dict(self.current)][-self.buffer_length:]
        return super().train_messages(server_round, nodes, config)

    def teacher(self, arch: str) -> ArrayRecord:
        """The parameter average of the buffered global models of group ``arch``."""
        records = [g[arch] for g in self.buffer if arch in g]
        return weighted_average(records, [1.0] * len(records))

    def client_config(self, server_round: int) -> dict[str, Any]:
        """``gkd-gamma`` (0 in round 1) and ``gkd-temperature`` for the clients."""
        return {"gkd-gamma": float(self.gamma) if server_round > 1 else 0.0,
                "gkd-temperature": float(self.temperature)}

    def extra_records(self, server_round: int, arch: str) -> dict[str, ArrayRecord]:
        """The teacher beside the global model (from round 2, when it is not the model)."""
        if self.buffer_length <= 1 or server_round <= 1 or self.gamma == 0:
            return {}
        return {"teacher": self.teacher(arch)}


@client_fn(TRAIN_TYPE)
def train_gkd(msg: Any, env: ClientEnv) -> RecordDict:
    """Local SGD on ``CE + γ · T² · KL(teacher ‖ local)``; send the weights back."""
    records = msg.content.array_records
    model = env.model_from(records["arrays"])
    gamma, t = float(env.config["gkd-gamma"]), float(env.config["gkd-temperature"])
    data = env.data
    extra = None
    if gamma > 0:
        teacher = copy.deepcopy(model)  # the received global model, unless a teacher came
        if "teacher" in records:
            teacher.load_state_dict(arrayrecord_to_state_dict(records["teacher"]))
        teacher.eval().requires_grad_(False)
        dev = next(model.parameters()).device

        def extra(idx: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher(data.x[idx].to(dev))
            return gamma * kd_kl(logits, teacher_logits, t)

    return train_and_reply(model, env, extra)
