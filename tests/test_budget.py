"""Communication budgets: a budgeted run never exceeds its budget; policies stop or shrink."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from grids import PlainGrid

from fedkd.budget import MB, Budgeted, BudgetExhausted
from fedkd.codecs import make_codec
from fedkd.comm import message_bytes
from fedkd.engine.runner import AccountingGrid
from fedkd.state import StateStore
from fedkd.wire import Wire, wire_mod
from strategies.fedavg import FedAvg

MODEL = ArrayRecord({"w": Array(np.random.default_rng(0).normal(size=(50, 40)).astype(
    np.float32)), "b": Array(np.zeros(40, np.float32))})
NODES = list(range(100, 110))


def run(budget: Budgeted, grid: AccountingGrid, rounds: int = 20) -> tuple[int, str]:
    """Flower's round loop over the budgeted strategy; returns rounds run and how it ended."""
    arrays = MODEL
    for rnd in range(1, rounds + 1):
        try:
            msgs = list(budget.configure_train(rnd, arrays, ConfigRecord(), grid))
        except BudgetExhausted:
            return rnd - 1, "budget_exhausted"
        new, _ = budget.aggregate_train(rnd, grid.send_and_receive(msgs))
        arrays = new if new is not None else arrays
        grid.reset()
    return rounds, "completed"


WIRES = {"fp32": ("fp32", {}, "fp32", {}), "fp16/topk": ("fp16", {}, "topk", {"fraction": 0.1}),
         "int8/qsgd": ("int8", {}, "qsgd", {"levels": 8})}


@pytest.mark.parametrize("wire_name", list(WIRES))
@pytest.mark.parametrize("policy", ["stop", "sample_fewer"])
def test_a_budgeted_run_never_exceeds_its_budget(tmp_path: Path, wire_name: str,
                                                 policy: str) -> None:
    d, dp, u, up = WIRES[wire_name]
    wire = Wire(make_codec(d, dp, "d"), make_codec(u, up, "u"))
    store = StateStore(str(tmp_path))
    rng = np.random.default_rng(hash((wire_name, policy)) % 2**32)
    for _ in range(5):
        total_mb = float(rng.uniform(0.05, 1.5))
        round_mb = float(rng.uniform(0.03, 0.2)) if rng.random() < 0.5 else None
        grid = AccountingGrid(PlainGrid(NODES, [wire_mod(wire, lambda: store)]), wire)
        budget = Budgeted(FedAvg(fraction_train=0.5, min_available_nodes=10), round_mb,
                          total_mb, policy)
        rounds, status = run(budget, grid)
        assert grid.spent <= total_mb * MB, (total_mb, round_mb, grid.spent)
        assert status == "budget_exhausted" or rounds == 20
        if policy == "sample_fewer" and rounds:
            assert budget.round_metrics(1, grid)["budget_dropped"] >= 0


def test_stop_ends_before_the_round_that_does_not_fit() -> None:
    grid = AccountingGrid(PlainGrid(NODES))
    one_round = 5 * 2 * message_bytes_of_model()  # 5 clients, model down and back
    budget = Budgeted(FedAvg(fraction_train=0.5, min_available_nodes=10), None,
                      (3 * one_round + one_round // 2) / MB, "stop")
    assert run(budget, grid) == (3, "budget_exhausted")
    assert grid.spent == 3 * one_round
    assert budget.round_metrics(3, grid)["budget_left_mb"] == pytest.approx(one_round / 2 / MB)


def test_sample_fewer_shrinks_the_round_with_a_seeded_choice() -> None:
    one_client = 2 * message_bytes_of_model()
    grid = AccountingGrid(PlainGrid(NODES))
    budget = Budgeted(FedAvg(fraction_train=0.5, min_available_nodes=10), 3.5 * one_client / MB,
                      None, "sample_fewer", seed=1)
    msgs = list(budget.configure_train(1, MODEL, ConfigRecord(), grid))
    assert len(msgs) == 3 and budget.dropped[1] == 2
    again = Budgeted(FedAvg(fraction_train=0.5, min_available_nodes=10), 3.5 * one_client / MB,
                     None, "sample_fewer", seed=1)
    same = list(again.configure_train(1, MODEL, ConfigRecord(), AccountingGrid(
        PlainGrid(NODES))))
    assert [m.metadata.dst_node_id for m in msgs] == [m.metadata.dst_node_id for m in same]


def test_wrapper_delegates_what_it_does_not_change() -> None:
    inner = FedAvg(fraction_train=0.5, min_available_nodes=10, seed=4)
    budget = Budgeted(inner, None, 1.0)
    assert budget.seed == 0 and inner.seed == 4  # the wrapper's own seed
    assert budget.fraction_train == 0.5 and budget.discover is not None
    with pytest.raises(ValueError, match="policy"):
        Budgeted(inner, None, 1.0, policy="drop")


def message_bytes_of_model() -> int:
    from flwr.app import RecordDict

    return message_bytes(RecordDict({"arrays": MODEL}))


def test_cli_budget_stops_cleanly(tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq
    from cli_runs import simulate_inline

    run_dir = simulate_inline(tmp_path, "rounds=6", "clients.fraction=0.5",
                              "clients.train.epochs=1", "comm.down.codec=fp16",
                              "comm.budget.total_mb=9", "eval_every=5")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert summary["status"] == "budget_exhausted" and 0 < len(rows) < 6
    total = rows[-1]["bytes_down_cum"] + rows[-1]["bytes_up_cum"]
    assert total <= 9e6 and summary["mb_sent"] <= 9
    assert all(r["acc"] is not None for r in rows)  # every round of a budgeted run is tested
    assert rows[-1]["budget_left_mb"] == pytest.approx(9 - total / 1e6)
    # fp16 down: each download is half the size of the fp32 upload
    assert rows[0]["bytes_down"] < 0.52 * rows[0]["bytes_up"]


def test_replies_larger_than_estimated_are_dropped_not_sent() -> None:
    """A strategy whose replies outgrow their requests (logits after a config-only request):
    the message layer drops the replies that would pass the budget."""
    from flwr.app import Array, Context, Message

    def inflate(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
        reply = call_next(msg, ctx)
        reply.content["arrays"]["extra"] = Array(np.zeros(20_000, np.float32))  # 80 kB more
        return reply

    grid = AccountingGrid(PlainGrid(NODES, [inflate]))
    total_mb = 0.3
    budget = Budgeted(FedAvg(fraction_train=0.5, min_available_nodes=10), None, total_mb)
    msgs = list(budget.configure_train(1, MODEL, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    dropped = [r for r in replies if r.has_error()]
    assert dropped and all(r.error.reason.startswith("BudgetExceeded: ") for r in dropped)
    assert grid.spent <= total_mb * MB
    assert len(dropped) < len(replies)  # the replies that fit were kept
