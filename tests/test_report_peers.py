"""``fedkd report``: the peers-on-graphs section (decentralized runs recording ``consensus``).

Two configurations x two seeds x three rounds, worked by hand:

- ``topology=ring``: seed 0 evaluates rounds 1 and 3 (None in round 2), seed 1 rounds 1 and 2
  (NaN in round 3), so the finals are round 3's and round 2's: acc 0.5, 0.7 (mean 0.6, sample
  sd sqrt(0.02)), consensus 0.4, 0.2 (mean 0.3), acc-min 0.3, 0.5, acc-worst10 0.35, 0.45;
  spectral gap 0.25 each round / 0.1, 0.2, 0.3 (means 0.25, 0.2: 0.225); edge MB 1.5 both,
  so acc per edge MB = (0.5 + 0.7) / 1.5 / 2 = 0.4.
- ``topology=complete``: acc 0.8, 0.6 (mean 0.7), consensus 0.0, 0.1 (mean 0.05), gap 1,
  edge MB 9 and 6 (mean 7.5), acc per edge MB = (0.8 / 9 + 0.6 / 6) / 2 = 17 / 180, local
  acc 0.9, 0.8 (mean 0.85).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fedkd.report import EDGE_MB_LABEL, find_runs, peer_rows, peers_figure, report

NAN = math.nan

RING = {
    0: {"acc": [0.3, None, 0.5], "consensus": [0.6, None, 0.4], "acc-min": [0.1, None, 0.3],
        "acc-worst10": [0.15, None, 0.35], "spectral_gap": [0.25, 0.25, 0.25],
        "edge_bytes_cum": [500_000, 1_000_000, 1_500_000]},
    1: {"acc": [0.4, 0.7, NAN], "consensus": [0.5, 0.2, None], "acc-min": [0.2, 0.5, NAN],
        "acc-worst10": [0.25, 0.45, NAN], "spectral_gap": [0.1, 0.2, 0.3],
        "edge_bytes_cum": [500_000, 1_000_000, 1_500_000]},
}
COMPLETE = {
    0: {"acc": [0.5, 0.6, 0.8], "consensus": [0.1, 0.05, 0.0], "acc-min": [0.4, 0.5, 0.7],
        "acc-worst10": [0.45, 0.55, 0.75], "local-acc": [0.6, 0.7, 0.9],
        "spectral_gap": [1.0] * 3, "edge_bytes_cum": [3_000_000, 6_000_000, 9_000_000]},
    1: {"acc": [0.4, 0.7, 0.6], "consensus": [0.2, 0.1, 0.1], "acc-min": [0.3, 0.6, 0.5],
        "acc-worst10": [0.35, 0.65, 0.55], "local-acc": [0.5, 0.6, 0.8],
        "spectral_gap": [1.0] * 3, "edge_bytes_cum": [2_000_000, 4_000_000, 6_000_000]},
}


def _fake_run(sweep: Path, config: str, seed: int, columns: dict[str, list[Any]],
              strategy: str = "peer_kd") -> None:
    """A finished sweep run ``sweep/<config>/seed-<seed>`` with one metrics row per round."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "sweep.json").write_text(json.dumps({"grid": {}, "seeds": []}))
    d = sweep / config / f"seed-{seed}"
    d.mkdir(parents=True)
    (d / "scenario.yaml").write_text(yaml.safe_dump(
        {"name": "toy", "seed": seed, "strategy": {"name": strategy, "params": {}}}))
    n = len(columns["acc"])
    rows = [{"round": i + 1, "bytes_down_cum": 1_000_000 * (i + 1), "bytes_up_cum": 0,
             **{k: v[i] for k, v in columns.items()}} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), d / "metrics.parquet")
    (d / "summary.json").write_text(json.dumps({"status": "completed"}))


def _sweep(root: Path) -> Path:
    sweep = root / "sweep"
    for config, seeds in (("topology=ring", RING), ("topology=complete", COMPLETE)):
        for seed, columns in seeds.items():
            _fake_run(sweep, config, seed, columns)
    _fake_run(sweep, "strategy=feddf", 0, {"acc": [0.2, 0.3, 0.4]}, "feddf")  # no peers
    return sweep


def test_peer_rows_by_hand(tmp_path: Path) -> None:
    complete, ring = peer_rows(find_runs([_sweep(tmp_path)]))
    assert ring["config"] == "topology=ring" and ring["seeds"] == 2
    assert ring["final_acc"] == pytest.approx(0.6)
    assert ring["final_acc_std"] == pytest.approx(math.sqrt(0.02))
    assert ring["final_consensus"] == pytest.approx(0.3)
    assert ring["final_consensus_std"] == pytest.approx(math.sqrt(0.02))
    assert ring["final_acc_min"] == pytest.approx(0.4)
    assert ring["final_acc_worst10"] == pytest.approx(0.4)
    assert ring["final_local_acc"] is None
    assert ring["spectral_gap"] == pytest.approx(0.225)
    assert ring["edge_mb"] == pytest.approx(1.5)
    assert ring["acc_per_edge_mb"] == pytest.approx(0.4)
    assert complete["config"] == "topology=complete"
    assert complete["final_acc"] == pytest.approx(0.7)
    assert complete["final_acc_std"] == pytest.approx(math.sqrt(0.02))
    assert complete["final_consensus"] == pytest.approx(0.05)
    assert complete["final_local_acc"] == pytest.approx(0.85)
    assert complete["spectral_gap"] == pytest.approx(1.0)
    assert complete["edge_mb"] == pytest.approx(7.5)
    assert complete["acc_per_edge_mb"] == pytest.approx(17 / 180)


def test_peers_figure_curves(tmp_path: Path) -> None:
    fig = peers_figure(find_runs([_sweep(tmp_path)]))
    assert fig is not None
    acc_round, cons_round, acc_mb, cons_mb = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "accuracy", "consensus (disagreement)", "accuracy", "consensus (disagreement)"]
    assert acc_mb.get_xlabel() == cons_mb.get_xlabel() == EDGE_MB_LABEL
    assert acc_round.get_xlabel() == "round"
    # one line per configuration with consensus (feddf left out), complete before ring
    assert all(len(ax.get_lines()) == 2 for ax in fig.axes)
    complete, ring = acc_round.get_lines()
    assert ring.get_xdata().tolist() == [1, 2, 3]
    assert ring.get_ydata().tolist() == pytest.approx([0.35, 0.7, 0.5])  # missing skipped
    assert cons_round.get_lines()[1].get_ydata().tolist() == pytest.approx([0.55, 0.2, 0.4])
    assert acc_mb.get_lines()[0].get_xdata().tolist() == pytest.approx([2.5, 5.0, 7.5])
    assert acc_mb.get_lines()[1].get_xdata().tolist() == pytest.approx([0.5, 1.0, 1.5])
    assert complete.get_color() == acc_mb.get_lines()[0].get_color()
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["complete", "ring"]
    assert acc_mb.get_xscale() == "log"


def test_report_writes_peers_section(tmp_path: Path) -> None:
    out = tmp_path / "report"
    _, _, text = report([_sweep(tmp_path)], out)
    for name in ("peers.md", "peers.png", "peers.parquet"):
        assert (out / name).stat().st_size > 0
    md = (out / "peers.md").read_text()
    assert md.startswith("## Peers on graphs") and md in text
    assert "| config | seeds | final acc | final min acc | final worst 10 % acc " \
           "| final local acc | final consensus | spectral gap | edge MB | acc per edge MB |" in md
    assert "| topology=ring | 2 | 0.6000 ± 0.1414 |" in md
    assert "| topology=complete | 2 | 0.7000 ± 0.1414 |" in md
    assert "feddf" not in md and "Consensus is the mean pairwise disagreement" in md
    table = pq.read_table(out / "peers.parquet").to_pylist()
    assert [r["config"] for r in table] == ["topology=complete", "topology=ring"]


def test_no_consensus_no_peers_section(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep, "strategy=feddf", 0, {"acc": [0.2, 0.3, 0.4]}, "feddf")
    _fake_run(sweep, "strategy=peer_kd", 0, {"acc": [0.2, 0.3, 0.4],
                                             "consensus": [None, NAN, None]})
    runs = find_runs([sweep])
    assert peer_rows(runs) == [] and peers_figure(runs) is None
    _, out, text = report([sweep])
    assert not (out / "peers.md").exists() and not (out / "peers.png").exists()
    assert "Peers on graphs" not in text


def test_short_labels_keep_values_of_shared_keys() -> None:
    from fedkd.report import short_labels

    assert short_labels(["name=dpsgd,topology=ring", "name=peer_kd,topology=ring"]) == {
        "name=dpsgd,topology=ring": "dpsgd, ring", "name=peer_kd,topology=ring": "peer_kd, ring"}
    mixed = ["name=dpsgd,topology=ring", "noniid/local"]
    assert short_labels(mixed) == {c: c for c in mixed}
