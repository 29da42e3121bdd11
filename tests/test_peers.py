"""Decentralized peers on a graph: peer_kd targets, dpsgd mixing, edge bytes, consensus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from grids import CidGrid, run_in_process

from fedkd.compose import build_strategy, load_scenario
from fedkd.errors import ScenarioError
from fedkd.world import build_world
from strategies import get_strategy
from strategies.dml import leave_one_out
from strategies.fedavg import NodeInfo
from strategies.fedmd import logits_record, record_logits
from strategies.peer_kd import QUERY_TYPE, TRAIN_TYPE, PeerKD
from strategies.peers import disagreement
from strategies.topology import make_topology
from strategies.weighting import TeacherContext, make_weighting

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
TOY_RUN = ["rounds=2", "clients.train.steps=3", "clients.train.batch_size=16",
           "partition.params.min_size=5", "clients.models=[{arch: mlp}]"]

# (K=4 peers, N=2 samples, C=3 classes)
TOY = torch.tensor([[[0.0, 3.0, 1.0], [6.0, 0.0, 0.0]],
                    [[3.0, 0.0, 0.0], [0.0, 6.0, 1.0]],
                    [[6.0, 6.0, 0.0], [3.0, 3.0, 3.0]],
                    [[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]]])


def test_disagreement_exact() -> None:
    preds = np.array([[0, 1, 2], [0, 1, 1], [0, 2, 1]])
    # sample 0: all agree; sample 1: one pair of 3 agrees; sample 2: one pair agrees
    assert disagreement(preds, 3) == pytest.approx((0 + 2 / 3 + 2 / 3) / 3)
    assert disagreement(preds[:1], 3) == 0.0


def _toy_peer_kd(topology: str, **params: Any) -> tuple[PeerKD, CidGrid, list[Any]]:
    strategy = get_strategy("peer_kd")(seed=1, public_size=2, temperature=2.0,
                                       topology={"name": topology}, **params)
    strategy.topology = make_topology({"name": topology}, 4, seed=0)
    strategy.nodes = [NodeInfo(node_id=50 + cid, cid=cid, arch="mlp", num_examples=cid + 1,
                               label_counts=(1, 1, 1)) for cid in range(4)]
    grid = CidGrid(strategy, lambda cid: RecordDict({
        "logits": logits_record(TOY[cid]),
        "metrics": MetricRecord({"train-loss": 0.5 + cid, "num-examples": 10})}))
    msgs = list(strategy.configure_train(3, None, ConfigRecord({"lr": 0.1}), grid))
    return strategy, grid, msgs


def test_peer_kd_on_a_complete_graph_sends_dml_targets() -> None:
    strategy, grid, msgs = _toy_peer_kd("complete")
    assert [m.metadata.message_type for m in grid.sent] == [QUERY_TYPE] * 4
    ctx = TeacherContext(num_examples=torch.arange(1.0, 5.0), label_counts=torch.ones(4, 3))
    dml, _ = leave_one_out(TOY, make_weighting("uniform"), ctx, temperature=2.0)
    for m, t, cid in zip(msgs, dml, range(4), strict=True):
        assert m.metadata.message_type == TRAIN_TYPE
        assert torch.equal(record_logits(m.content.array_records["peers"]), t)
        assert m.content.config_records["config"]["local-loss"] == 0.5 + cid
    assert strategy.edge_log[3] == [(s, d) for s in range(4) for d in range(4) if s != d]
    assert strategy.graph_metrics[3] == {"spectral-gap": pytest.approx(1.0), "edges": 12}


def test_peer_kd_on_a_ring_distils_from_its_two_neighbours_only() -> None:
    strategy, _, msgs = _toy_peer_kd("ring")
    probs = torch.softmax(TOY / 2.0, dim=2)
    for k, m in enumerate(msgs):
        expected = (probs[(k - 1) % 4] + probs[(k + 1) % 4]) / 2
        torch.testing.assert_close(record_logits(m.content.array_records["peers"]), expected)
    assert strategy.edge_log[3] == [(0, 1), (0, 3), (1, 0), (1, 2), (2, 1), (2, 3), (3, 0),
                                    (3, 2)]
    # ring of 4, Metropolis weights 1/3: eigenvalues 1, 1/3, 1/3, -1/3
    assert strategy.graph_metrics[3]["spectral-gap"] == pytest.approx(2 / 3)
    rows = strategy.teacher_log.rows[3]
    assert [r["weight"] for r in rows] == [pytest.approx(0.5)] * 4


def test_peer_kd_rejects_an_unknown_shared_data() -> None:
    with pytest.raises(ScenarioError, match=r"strategy\.params\.shared_data"):
        get_strategy("peer_kd")(shared_data="synthetic")


def test_dpsgd_rejects_heterogeneous_models() -> None:
    world = build_world(load_scenario(QUICKSTART, [
        "strategy.name=dpsgd", "clients.models=[{arch: mlp, fraction: 0.5}, "
        "{arch: cnn_small, fraction: 0.5}]"]))
    with pytest.raises(ScenarioError, match=r"^clients\.models"):
        build_strategy(world.scenario, world)


def test_dpsgd_on_a_complete_graph_equals_fedavg_with_full_participation(
        tmp_path: Path) -> None:
    # 3 IID clients of exactly 431 samples each: FedAvg's size weights are Metropolis' 1/3
    same = [*TOY_RUN, "clients.num=3", "partition.name=iid", "partition.params={}",
            "data.val_fraction=0.0", "rounds=3"]
    world = build_world(load_scenario(QUICKSTART, [*same, "strategy.name=fedavg"]))
    assert [len(p) for p in world.parts] == [431, 431, 431]
    fedavg = run_in_process(world, tmp_path / "fedavg")
    dpsgd_world = build_world(load_scenario(QUICKSTART, [*same, "strategy.name=dpsgd"]))
    dpsgd = run_in_process(dpsgd_world, tmp_path / "dpsgd")
    for a, b in zip(fedavg, dpsgd, strict=True):
        assert b.eval_metrics["acc"] == pytest.approx(a.eval_metrics["acc"], abs=1e-6)
        assert b.eval_metrics["loss"] == pytest.approx(a.eval_metrics["loss"], rel=1e-5)
        assert b.eval_metrics["consensus"] == pytest.approx(0.0, abs=1e-6)
        assert b.train_metrics["train-loss"] == pytest.approx(a.train_metrics["train-loss"],
                                                              rel=1e-5)


def _cli(tmp: Path, *overrides: str) -> Path:
    """``fedkd simulate`` on the inline engine, in this process (the CLI's own code path
    without a second interpreter's start-up; the exit-code test below runs a real one)."""
    from fedkd.cli import main

    out = tmp / "runs"
    args = ["simulate", str(QUICKSTART), "--out", str(out), "--no-progress",
            "--set", "engine.name=inline"]
    for o in [*TOY_RUN, *overrides]:
        args += ["--set", o]
    assert main(args) == 0
    (run,) = (out / "quickstart").iterdir()
    return run


def test_peer_kd_cli_writes_bytes_per_edge(tmp_path: Path) -> None:
    run = _cli(tmp_path, "strategy.name=peer_kd", "clients.num=6",
               "strategy.params.public_size=40", "strategy.params.topology.name=ring",
               "data.local_test_fraction=0.2")
    edges = pq.read_table(run / "edges.parquet").to_pylist()
    # a ring of 6: 12 directed edges a round; each carries its sender's 40 x 10 float32
    # logits (1,600 bytes) and the .npy header (128 bytes)
    assert len(edges) == 24
    assert {e["bytes"] for e in edges} == {40 * 10 * 4 + 128}
    assert [(e["src"], e["dst"]) for e in edges[:4]] == [(0, 1), (0, 5), (1, 0), (1, 2)]
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [m["edge_bytes"] for m in metrics] == [12 * 1728] * 2
    assert [m["edge_bytes_cum"] for m in metrics] == [12 * 1728, 24 * 1728]
    assert [m["edge_bytes_per_peer"] for m in metrics] == [2 * 1728] * 2
    assert [m["spectral_gap"] for m in metrics] == [pytest.approx(1 / 3)] * 2
    for m in metrics:
        assert 0.0 < m["consensus"] <= 1.0
        assert m["acc-min"] <= m["acc-worst10"] <= m["acc"]
        assert m["local-acc-min"] <= m["local-acc-worst10"] <= m["local-acc"]


def test_partial_participation_uses_edges_among_sampled_peers_only(tmp_path: Path) -> None:
    run = _cli(tmp_path, "strategy.name=dpsgd", "clients.num=8", "clients.fraction=0.5",
               "strategy.params.topology.name=complete")
    clients = pq.read_table(run / "clients.parquet").to_pylist()
    edges = pq.read_table(run / "edges.parquet").to_pylist()
    for rnd in (1, 2):
        active = {c["client"] for c in clients if c["round"] == rnd and c["bytes_up"] > 0}
        assert len(active) == 4
        pairs = {(e["src"], e["dst"]) for e in edges if e["round"] == rnd}
        assert pairs == {(s, d) for s in active for d in active if s != d}


def test_the_up_codec_encodes_what_crosses_each_edge(tmp_path: Path) -> None:
    run = _cli(tmp_path, "strategy.name=peer_kd", "clients.num=4",
               "strategy.params.public_size=40", "strategy.params.topology.name=ring",
               "comm.up.codec=fp16", "rounds=1")
    edges = pq.read_table(run / "edges.parquet").to_pylist()
    up = {c["client"]: c["bytes_up"] for c in pq.read_table(run / "clients.parquet").to_pylist()}
    assert len(edges) == 8
    assert all(e["bytes"] == up[e["src"]] for e in edges)
    # 40 x 10 float16 logits (800 bytes) and the .npy header, not float32's 1,728 bytes
    assert {e["bytes"] for e in edges} == {40 * 10 * 2 + 128}


# ----------------------------------------------------------------------------- generated batches
class GeneratedGrid:
    """Peers of a ``generated`` round: peer ``c`` draws ``x = c + 0.1 * arange`` (N = 2,
    one-pixel images) and labels any input ``x`` with ``TOY[c, 0] + x``."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.sent: list[Any] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Array, ArrayRecord, Message

        from strategies.peer_kd import GENERATE_TYPE

        out = []
        for m in list(messages):
            self.sent.append(m)
            c = self.strategy.node(m.metadata.dst_node_id).cid
            if m.metadata.message_type == GENERATE_TYPE:
                x = (c + 0.1 * torch.arange(2.0)).reshape(2, 1, 1, 1)
                content = RecordDict({
                    "inputs": ArrayRecord({"x": Array(x.numpy()),
                                           "y": Array(np.array([0, 1]))}),
                    "logits": logits_record(TOY[c]),
                    "metrics": MetricRecord({"train-loss": 1.0, "num-examples": 10})})
            else:
                x = torch.from_numpy(m.content.array_records["inputs"]["x"].numpy())
                content = RecordDict({"logits": logits_record(
                    TOY[c, 0] + x.reshape(-1, 1))})
            out.append(Message(content, reply_to=m))
        return out


def test_generated_targets_are_the_neighbours_labels_of_each_peers_own_batch() -> None:
    strategy = get_strategy("peer_kd")(seed=1, public_size=2, shared_data="generated",
                                       topology={"name": "ring"})
    strategy.topology = make_topology({"name": "ring"}, 4, seed=0)
    strategy.nodes = [NodeInfo(node_id=50 + cid, cid=cid, arch="mlp", num_examples=10,
                               label_counts=(1, 1, 1)) for cid in range(4)]
    grid = GeneratedGrid(strategy)
    msgs = list(strategy.configure_train(2, None, ConfigRecord({"lr": 0.1}), grid))
    for d, m in enumerate(msgs):
        x = d + 0.1 * torch.arange(2.0)
        expected = sum(torch.softmax(TOY[s, 0] + x.reshape(-1, 1), dim=1)
                       for s in ((d - 1) % 4, (d + 1) % 4)) / 2
        torch.testing.assert_close(record_logits(m.content.array_records["peers"]), expected)
        assert m.content.config_records["config"]["shared-data"] == "generated"
    # each label query carries the two neighbours' batches of 2 one-pixel images
    labels = [m for m in grid.sent if m.metadata.message_type.endswith("peer_kd_label")]
    assert [m.content.array_records["inputs"]["x"].numpy().shape for m in labels] == [
        (4, 1, 1, 1)] * 4
    # an edge s -> d: s's batch (2 float32 pixels + .npy header) and s's 2 x 3 logits on d's
    assert set(strategy.edge_sizes[2].values()) == {(2 * 4 + 128) + (2 * 3 * 4 + 128)}
    assert sorted(strategy.edge_sizes[2]) == strategy.edge_log[2]
    assert [r["weight"] for r in strategy.teacher_log.rows[2]] == [pytest.approx(0.5)] * 4


def test_synthesise_is_seeded_bounded_and_keeps_its_generator(tmp_path: Path) -> None:
    from fedkd.client import ClientEnv, train_config_record
    from fedkd.state import StateStore
    from strategies.peer_kd import GENERATOR_KEY, synthesise

    world = build_world(load_scenario(QUICKSTART))
    cfg = {**dict(train_config_record(world.scenario.clients.train, seed=0)),
           "server-round": 1, "subset-size": 12, "gen-steps": 3, "gen-lr": 1e-3,
           "noise-dim": 8, "gen-width": 4, "lambda-bn": 1.0, "lambda-div": 1.0}
    batches = []
    for name in ("a", "b"):
        env = ClientEnv(cid=2, world=world, store=StateStore(tmp_path / name),
                        config=ConfigRecord(cfg))
        model = world.new_model("cnn_small", seed=0)
        batches.append(synthesise(model, env))
        assert env.store.load(2, GENERATOR_KEY) is not None
        assert all(p.requires_grad for p in model.parameters())
    (x, y), (x2, y2) = batches
    assert x.shape == (12, 1, 8, 8) and y.shape == (12,)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    pool = world.data.pool.x
    assert x.min() >= pool.min() - 1e-6 and x.max() <= pool.max() + 1e-6


def test_generated_needs_image_data(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "fedkd.cli", "simulate", str(QUICKSTART), "--out", str(out),
         "--no-progress", "--set", "strategy.name=peer_kd", "--set", "data.name=synthetic",
         "--set", "strategy.params.shared_data=generated", "--set", "engine.name=inline"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "fedkd: error: strategy.params.shared_data: got 'generated'; allowed: public")
    assert "Traceback" not in proc.stderr


def test_generated_cli_run_sizes_every_edge(tmp_path: Path) -> None:
    run = _cli(tmp_path, "strategy.name=peer_kd", "clients.num=4", "rounds=1",
               "strategy.params.shared_data=generated", "strategy.params.public_size=16",
               "strategy.params.gen_steps=2", "strategy.params.topology.name=ring",
               "clients.models=[{arch: cnn_small}]")
    edges = pq.read_table(run / "edges.parquet").to_pylist()
    # 16 generated 1 x 8 x 8 images out, the sender's 16 x 10 logits on the other's batch back
    assert len(edges) == 8
    assert {e["bytes"] for e in edges} == {(16 * 64 * 4 + 128) + (16 * 10 * 4 + 128)}
    teachers = pq.read_table(run / "teachers.parquet").to_pylist()
    assert {t["source"] for t in teachers} == {"generated"}
    (metrics,) = pq.read_table(run / "metrics.parquet").to_pylist()
    assert 0.0 <= metrics["teach_ens_acc"] <= 1.0 and metrics["kl_loss"] > 0


# ----------------------------------------------------------------------------- budgets on edges
def test_a_total_budget_over_edges_stops_the_run_before_the_round_that_would_pass_it(
        tmp_path: Path) -> None:
    # a ring of 6: 6 links a round, each 2 x 1,728 bytes of logits -> 20,736 B a round;
    # 50,000 B hold two rounds
    run = _cli(tmp_path, "strategy.name=peer_kd", "clients.num=6", "rounds=4",
               "strategy.params.public_size=40", "strategy.params.topology.name=ring",
               "comm.budget.total_mb=0.05")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "budget_exhausted" and summary["rounds"] == 2
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [m["edge_bytes_cum"] for m in metrics] == [20_736, 41_472]
    assert metrics[-1]["budget_left_mb"] == pytest.approx((50_000 - 41_472) / 1e6)


def test_sample_fewer_keeps_the_links_that_fit_both_ways(tmp_path: Path) -> None:
    # dpsgd on a complete graph of 5: 10 links of 2 x model bytes; a round cap of 3 links
    world = build_world(load_scenario(QUICKSTART, [*TOY_RUN, "clients.num=5"]))
    from fedkd.comm import array_bytes, state_dict_to_arrayrecord

    model = array_bytes(state_dict_to_arrayrecord(world.new_model("mlp", 0).state_dict()))
    cap = 3 * 2 * model + 10
    run = _cli(tmp_path, "strategy.name=dpsgd", "clients.num=5",
               f"comm.budget.round_mb={cap / 1e6}", "comm.budget.policy=sample_fewer")
    metrics = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [m["budget_dropped"] for m in metrics] == [7.0, 7.0]
    assert [m["edge_bytes"] for m in metrics] == [6 * model] * 2
    edges = pq.read_table(run / "edges.parquet").to_pylist()
    for rnd in (1, 2):
        pairs = {(e["src"], e["dst"]) for e in edges if e["round"] == rnd}
        assert len(pairs) == 6 and pairs == {(d, s) for s, d in pairs}  # symmetric
