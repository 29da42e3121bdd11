"""Failure injection: dropout and crashes as a ClientApp mod, seeded per round and client."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedkd.faults import ClientCrash, ClientDropout, fault_mod


def _msg(rnd: int, dropout: float = 0.0, crash: float = 0.0, kind: str = "train") -> Message:
    config = ConfigRecord({"seed": 0, "server-round": rnd, "dropout": dropout, "crash": crash})
    return Message(RecordDict({"config": config}), dst_node_id=5, message_type=kind)


def _ctx(cid: int) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": cid}, state=RecordDict(),
                   run_config={})


def test_crash_runs_the_work_then_fails_and_dropout_fails_before() -> None:
    calls: list[int] = []

    def handler(msg: Message, ctx: Context) -> Message:
        calls.append(1)
        return Message(RecordDict(), reply_to=msg)

    outcomes = {"ok": 0, "crash": 0}
    for rnd in range(1, 41):
        try:
            fault_mod(_msg(rnd, crash=0.3), _ctx(3), handler)
            outcomes["ok"] += 1
        except ClientCrash as exc:
            assert str(exc) == f"client 3 crashed while training in round {rnd}"
            outcomes["crash"] += 1
    assert len(calls) == 40 and 6 <= outcomes["crash"] <= 20  # ~30% of 40, all trained
    with pytest.raises(ClientDropout):
        fault_mod(_msg(1, dropout=0.999999), _ctx(3), handler)
    assert len(calls) == 40  # a dropped-out client does no work
    fault_mod(_msg(1, crash=0.999999, kind="evaluate"), _ctx(3), handler)  # train only


def test_same_seed_round_and_client_same_fate() -> None:
    def fate(rnd: int, cid: int) -> bool:
        try:
            fault_mod(_msg(rnd, crash=0.5), _ctx(cid),
                      lambda m, c: Message(RecordDict(), reply_to=m))
            return True
        except ClientCrash:
            return False

    first = [fate(r, c) for r in range(1, 6) for c in range(6)]
    assert first == [fate(r, c) for r in range(1, 6) for c in range(6)]
    assert 5 < sum(first) < 25


def test_cli_crash_completes_and_records_failures(tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq
    from cli_runs import simulate_inline

    run_dir = simulate_inline(tmp_path, "rounds=3", "clients.crash=0.3",
                              "clients.train.epochs=1")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert sum(r["failures"] for r in rows) > 0 and all(r["failures"] < 10 for r in rows)
    clients = pq.read_table(run_dir / "clients.parquet").to_pylist()
    assert sum(c["failed"] for c in clients) == sum(r["failures"] for r in rows)
    assert "ClientCrash: client" in (run_dir / "engine.log").read_text()
