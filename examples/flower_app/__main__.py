"""``python -m flower_app`` (from ``examples/``): run the app in Flower's simulation."""

from __future__ import annotations

from flwr.simulation import run_simulation

from .client_app import app as client_app
from .server_app import RESULT
from .server_app import app as server_app

if __name__ == "__main__":
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=4)
    for rnd, metrics in sorted(RESULT["result"].evaluate_metrics_serverapp.items()):
        print(f"round {rnd}: test accuracy {metrics['accuracy']:.3f}")
