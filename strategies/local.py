"""Training alone: every client trains its own persistent model on its private data.

Nothing but metrics crosses the network. It is the baseline that FedMD (Li & Wang 2019) and
deep mutual learning (Zhang et al. CVPR 2018) are measured against ("each client's accuracy
vs training alone"), and the base class of strategies whose clients keep private models:
they have no global model, so accuracy is the mean of the clients' own models on the test
set (``evaluate.private``), reported every ``eval_every`` rounds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from fedkd.client import ClientEnv, client_fn
from fedkd.train import train_supervised
from fedkd.world import World
from strategies import STRATEGIES
from strategies.fedavg import FedAvg, NodeInfo


@STRATEGIES.register("local")
class Local(FedAvg):
    """Clients train private models alone; the server only samples and evaluates them."""

    train_type = f"{MessageType.TRAIN}.local"

    def initial_arrays(self, world: World) -> ArrayRecord:
        """No global model."""
        return ArrayRecord()

    def train_messages(self, server_round: int, nodes: Sequence[NodeInfo],
                       config: ConfigRecord) -> list[Message]:
        """A config-only message per sampled client."""
        content = RecordDict({"config": ConfigRecord({**dict(config),
                                                      "server-round": server_round})})
        return [Message(content, dst_node_id=n.node_id, message_type=self.train_type,
                        group_id=str(server_round)) for n in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Nothing to aggregate but the train loss."""
        ok = self.split_replies(server_round, replies)
        if not ok:
            return None, None
        return None, self.train_metrics_aggr_fn([r.content for r in ok], self.weighted_by_key)

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
                                                      "server-round": server_round})})
        return [Message(content, dst_node_id=n.node_id,
                        message_type=f"{MessageType.EVALUATE}.private",
                        group_id=str(server_round)) for n in self.discover(grid)]

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """``acc``/``loss``: unweighted means over clients of their private models' scores."""
        metrics = [r.content.metric_records["metrics"] for r in replies if not r.has_error()]
        if not metrics:
            return None
        accs = [float(m["eval-acc"]) for m in metrics]
        return MetricRecord({"acc": float(np.mean(accs)), "acc-min": float(np.min(accs)),
                             "loss": float(np.mean([float(m["eval-loss"]) for m in metrics]))})


@client_fn("train.local")
def train_local(msg: Message, env: ClientEnv) -> RecordDict:
    """Train the private model on private data and keep it."""
    model, _ = env.private_model()
    result = train_supervised(model, env.data.x, env.data.y, env.train_config, seed=env.seed())
    env.save_private(model)
    return RecordDict({"metrics": MetricRecord({"num-examples": len(env.data),
                                                "train-loss": result.loss})})
