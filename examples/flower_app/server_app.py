"""The ServerApp: Flower's own ``Strategy.start`` loop driving fedkd's FedDF.

FedDF gets what fedkd's engine would otherwise give it: the proxy inputs, a labeled
validation split and the model builder. The ClientApp does not answer fedkd's handshake, so
the strategy samples the grid's node ids with its seed and weights replies by their
``num-examples``, as Flower's own FedAvg does.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from strategies.feddf import FedDF

from .task import Net, accuracy, server_data

NUM_ROUNDS = 3
app = ServerApp()

#: The last run's result (read by ``__main__`` and the tests).
RESULT: dict[str, Any] = {}


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Test accuracy of the global model."""
    data = server_data()
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    return MetricRecord({"accuracy": accuracy(model, data["test_x"], data["test_y"])})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedDF for ``num-server-rounds`` (default 3) rounds."""
    data = server_data()
    num_nodes = len(list(grid.get_node_ids()))
    strategy = FedDF(fraction_train=1.0, min_available_nodes=max(num_nodes, 1), seed=0,
                     proxy=data["proxy"], validation=(data["val_x"], data["val_y"]),
                     model_fn=Net, distill_steps=100)
    rounds = int(context.run_config.get("num-server-rounds", NUM_ROUNDS))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=rounds, evaluate_fn=central_evaluate)
    RESULT.update(result=result, strategy=strategy)
