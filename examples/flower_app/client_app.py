"""The ClientApp: a Flower template's ``train`` and ``evaluate``, unaware of fedkd."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from .task import Net, accuracy, client_data, train

app = ClientApp()


def received(msg: Message, context: Context) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model the server sent, and this client's data."""
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = client_data(int(context.node_config["partition-id"]),
                       int(context.node_config["num-partitions"]))
    return model, x, y


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received model on this client's data and send it back."""
    model, x, y = received(msg, context)
    loss = train(model, x, y)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this client's data."""
    model, x, y = received(msg, context)
    metrics = MetricRecord({"eval_acc": accuracy(model, x, y), "num-examples": len(y)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
