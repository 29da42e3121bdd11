"""The run folder: resolved scenario, partition report, per-round Parquet rows, plots, summary.

Rows are written as each round ends, so a killed run keeps its finished rounds. A progress bar
shows round, accuracy and MB; with a metrics port, a Prometheus endpoint on 127.0.0.1 exposes
the same while the run goes, labelled with the scenario, run folder and strategy names. The
trackers ``output`` turns on (:mod:`fedkd.trackers`: TensorBoard, MLflow) get every round's
row too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fedkd.engine.runner import RoundResult
from fedkd.record import ParquetLog, PromExporter, plot_accuracy, plot_partition
from fedkd.scenario import dump
from fedkd.trackers import build_trackers, check_trackers
from fedkd.world import World


def write_partition(world: World, run_dir: Path) -> None:
    """``partition.parquet`` (one row per client: arch, training size, count per class, and
    the local test size when clients hold local test splits) and its heat-map."""
    counts = world.counts
    table = {"client": list(range(world.num_clients)), "arch": list(world.archs),
             "num_examples": [int(c.sum()) for c in counts]}
    if world.has_local_tests:
        table["num_local_test"] = [len(t) for t in world.local_tests]
    for k in range(counts.shape[1]):
        table[f"class_{k}"] = [int(v) for v in counts[:, k]]
    pq.write_table(pa.table(table), run_dir / "partition.parquet")
    plot_partition(counts, run_dir / "partition.png",
                   f"{world.scenario.name}: {world.scenario.partition.name} partition")


class RunRecorder:
    """Receives each finished round and keeps the run folder up to date.

    Parameters
    ----------
    world : World
        The simulated world.
    run_dir : Path
        The run folder (created by the caller).
    strategy : Any
        The running strategy: maps node ids to clients (``node(nid).cid``) and may expose
        ``teacher_log`` (:class:`fedkd.diagnostics.TeacherLog`): per-teacher rows for
        ``teachers.parquet`` and the round's teacher diagnostics for ``metrics.parquet``, and
        ``edge_log`` (peers on a graph, :mod:`strategies.peers`): the ``(src, dst)`` partition
        ids of every edge a peer's upload crossed in a round, for ``edges.parquet`` (its
        bytes: the sender's upload, or the strategy's ``edge_sizes`` where it sized them).
    metrics_port : int, optional
        Serve Prometheus metrics on ``127.0.0.1:<port>``.
    progress : bool
        Show a progress bar.
    resume_round : int
        The checkpoint round of a resumed run (0: a new run).

    Raises
    ------
    ScenarioError
        When ``output`` turns on a tracker whose package is missing (before anything is
        written to the run folder).
    """

    def __init__(self, world: World, run_dir: Path, strategy: Any,
                 metrics_port: int | None = None, progress: bool = True,
                 resume_round: int = 0) -> None:
        self.world = world
        self.run_dir = run_dir
        self.strategy = strategy
        check_trackers(world.scenario.output)  # a missing package stops before any write
        (run_dir / "scenario.yaml").write_text(dump(world.scenario))
        write_partition(world, run_dir)
        self.metrics = ParquetLog(run_dir / "metrics.parquet")
        self.clients = ParquetLog(run_dir / "clients.parquet")
        self.teachers = ParquetLog(run_dir / "teachers.parquet")
        self.edges = ParquetLog(run_dir / "edges.parquet")
        if resume_round:  # a resumed run: keep the rows up to its checkpoint, drop the rest
            for log in (self.metrics, self.clients, self.teachers, self.edges):
                if log.path.exists():
                    rows = pq.read_table(log.path).to_pylist()
                    log.extend([r for r in rows if r["round"] <= resume_round])
        scn = world.scenario
        self.prom = PromExporter(metrics_port, scenario=scn.name, run=run_dir.name,
                                 strategy=scn.strategy.name) if metrics_port else None
        self.bar = tqdm(total=world.scenario.rounds, desc=world.scenario.name, unit="round",
                        initial=resume_round, disable=not progress, dynamic_ncols=True)
        rows = self.metrics.rows
        last = rows[-1] if rows else {}
        self.cum = [int(last.get("bytes_down_cum", 0)), int(last.get("bytes_up_cum", 0))]
        self.edge_cum = int(last.get("edge_bytes_cum") or 0)
        self.start = time.perf_counter()
        try:
            self.trackers = build_trackers(world.scenario, run_dir, resume_round)
        except BaseException:  # e.g. an unreachable MLflow server: release what was started
            self.bar.close()
            if self.prom is not None:
                self.prom.close()
            raise

    def __call__(self, res: RoundResult) -> None:
        """Record one finished round."""
        down = sum(t.down for t in res.traffic.values())
        up = sum(t.up for t in res.traffic.values())
        self.cum[0] += down
        self.cum[1] += up
        row: dict[str, Any] = {"round": res.round, **res.eval_metrics}
        row.update({k.replace("-", "_"): v for k, v in res.train_metrics.items()
                    if isinstance(v, int | float) and k != "num-examples"})
        log = getattr(self.strategy, "teacher_log", None)
        if log is not None:
            row.update({k.replace("-", "_"): v for k, v in log.metrics.get(res.round, {}).items()})
        row.update({
            "train_loss": res.train_metrics.get("train-loss"),
            "bytes_down": down, "bytes_up": up,
            "bytes_down_cum": self.cum[0], "bytes_up_cum": self.cum[1],
            "participants": sum(1 for t in res.traffic.values() if t.metrics or t.failed),
            "failures": sum(1 for t in res.traffic.values() if t.failed),
            "wall_s": res.seconds, "elapsed_s": time.perf_counter() - self.start,
        })
        row.update(self.record_edges(res))
        self.metrics.append(row)
        self.clients.extend([
            {"round": res.round, "client": self._cid(nid), "arch": self.world.archs[
                self._cid(nid)], "bytes_down": t.down, "bytes_up": t.up, "failed": t.failed,
             "train_loss": t.metrics.get("train-loss"),
             "num_examples": t.metrics.get("num-examples"),
             "eval_acc": t.eval.get("eval-acc"), "eval_loss": t.eval.get("eval-loss"),
             **({"local_acc": t.eval.get("local-acc"), "local_loss": t.eval.get("local-loss")}
                if self.world.has_local_tests else {})}
            for nid, t in sorted(res.traffic.items(), key=lambda kv: self._cid(kv[0]))
            if t.down or t.up or t.failed or t.metrics or t.eval])
        teachers = log.rows.get(res.round) if log is not None else None
        if teachers:
            self.teachers.extend([{"round": res.round, **t} for t in teachers])
        if self.prom is not None:
            self.prom.update(res.round, row.get("acc"), row.get("loss"), down, up)
        for tracker in self.trackers:
            tracker.log_round(res.round, row)
        acc = row.get("acc")
        shown = [f"acc={acc:.4f}"] if acc is not None else []
        self.bar.set_postfix_str(" ".join([*shown, f"MB={sum(self.cum) / 1e6:.2f}"]))
        self.bar.update(1)

    def record_edges(self, res: RoundResult) -> dict[str, Any]:
        """``edges.parquet`` rows of a strategy whose peers talk along a graph (its
        ``edge_log``; each edge carries its sender's upload) and the round's edge totals:
        ``edge_bytes``, ``edge_bytes_cum`` and ``edge_bytes_per_peer`` (per sampled peer)."""
        edges = getattr(self.strategy, "edge_log", None)
        if edges is None:
            return {}
        sent = {self._cid(nid): t.up for nid, t in res.traffic.items()}
        sizes = getattr(self.strategy, "edge_sizes", {}).get(res.round, {})
        rows = [{"round": res.round, "src": src, "dst": dst,
                 "bytes": int(sizes.get((src, dst), sent.get(src, 0)))}
                for src, dst in edges.get(res.round, [])]
        if rows:
            self.edges.extend(rows)
        total = sum(r["bytes"] for r in rows)
        self.edge_cum += total
        peers = sum(1 for t in res.traffic.values() if t.metrics or t.failed)
        return {"edge_bytes": total, "edge_bytes_cum": self.edge_cum,
                "edge_bytes_per_peer": total / peers if peers else 0.0}

    def _cid(self, node_id: int) -> int:
        return self.strategy.node(node_id).cid

    def close(self, status: str) -> dict[str, Any]:
        """Close the exporter and trackers, write ``summary.json`` and ``accuracy.png``;
        return the summary."""
        self.bar.close()
        if self.prom is not None:
            self.prom.close()
        for tracker in self.trackers:
            tracker.close(status)
        rows = self.metrics.rows
        accs = [r["acc"] for r in rows if r.get("acc") is not None and not math.isnan(r["acc"])]
        local = [r["local-acc"] for r in rows
                 if r.get("local-acc") is not None and not math.isnan(r["local-acc"])]
        summary = {
            "scenario": self.world.scenario.name, "status": status,
            "rounds": len(rows), "final_acc": accs[-1] if accs else None,
            "best_acc": max(accs) if accs else None,
            **({"final_local_acc": local[-1]} if local else {}),
            "mb_sent": sum(self.cum) / 1e6, "mb_down": self.cum[0] / 1e6,
            "mb_up": self.cum[1] / 1e6,
            "wall_s": time.perf_counter() - self.start, "run_dir": str(self.run_dir),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if rows:
            plot_accuracy(rows, self.run_dir / "accuracy.png")
        return summary
