"""The ``fedkd`` command: simulate | validate | partition | sweep | report | list.

Bad input (scenario keys, values, missing data) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedkd.engine.runner import AllClientsFailed
from fedkd.errors import DataUnavailableError, ScenarioError

EXIT_BAD_INPUT = 2


def _scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario value, e.g. --set clients.fraction=0.5")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="fedkd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a scenario and write a run folder")
    sim.add_argument("scenario", nargs="?", help="scenario YAML file (not with --resume)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario value, e.g. --set clients.fraction=0.5")
    sim.add_argument("--resume", metavar="RUN_DIR",
                     help="continue a stopped run from its last checkpoint")
    sim.add_argument("--out", help="folder for runs (default: the scenario's output.dir)")
    sim.add_argument("--engine", choices=["ray", "flower", "inline"], help="runtime (default: ray)")
    sim.add_argument("--ray-address", help="attach to a Ray cluster: auto or ray://host:port")
    sim.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1")
    sim.add_argument("--verbose", action="store_true", help="show Ray and Flower logs")
    sim.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sim.add_argument("--run-dir", help="exact run folder (default: <out>/<name>/<timestamp>)")

    val = sub.add_parser("validate", help="check a scenario (and that its data loads)")
    _scenario_args(val)

    part = sub.add_parser("partition", help="print per-client class counts, write a heat-map")
    _scenario_args(part)
    part.add_argument("--png", help="heat-map path (default: <scenario name>_partition.png)")

    swp = sub.add_parser("sweep", help="run a grid of overrides x seeds (resumable)")
    _scenario_args(swp)
    swp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="a grid axis, e.g. strategy.params.weighting=uniform,entropy")
    swp.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    swp.add_argument("--out", help="sweep folder (default: runs/<name>/sweep-<hash>)")
    swp.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    swp.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    rpt = sub.add_parser("report", help="compare runs/sweeps: table over seeds and plots")
    rpt.add_argument("paths", nargs="+", help="run or sweep folders")
    rpt.add_argument("--out", help="where to write the report (default: the first path)")
    rpt.add_argument("--target", type=float, help="target accuracy for rounds/MB to target")
    rpt.add_argument("--baseline", metavar="CONFIG",
                     help="config whose mean final accuracy is the target, and which every "
                          "other config is compared with seed by seed (paired.md)")

    sub.add_parser("list", help="registered components (datasets ... weightings, codecs)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if getattr(args, "engine", None):
        extra.append(f"engine.name={args.engine}")
    if getattr(args, "ray_address", None):
        extra.append(f"engine.ray_address={args.ray_address}")
    return [*args.overrides, *extra]


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the scenario and print a short summary."""
    from fedkd.compose import load_scenario
    from fedkd.engine.simulate import simulate

    if args.resume:
        if args.scenario or _overrides(args) or args.run_dir:
            raise ScenarioError("--resume", args.resume, "a run folder alone (its scenario.yaml "
                                "is the scenario; no SCENARIO, --set or --run-dir beside it)")
        scn = load_scenario(Path(args.resume) / "scenario.yaml")
        run_dir = args.resume
    elif args.scenario is None:
        raise ScenarioError("SCENARIO", None, "a scenario YAML file (or --resume RUN_DIR)")
    else:
        scn, run_dir = load_scenario(args.scenario, _overrides(args)), args.run_dir
    summary = simulate(scn, out=args.out, metrics_port=args.metrics_port,
                       verbose=args.verbose, progress=not args.no_progress,
                       run_dir=run_dir, resume=bool(args.resume))
    print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """The closing lines of ``fedkd simulate``."""
    acc = (f"final accuracy {s['final_acc']:.4f}, best {s['best_acc']:.4f}"
           if s["final_acc"] is not None else "no accuracy recorded")
    ended = "" if s.get("status", "completed") == "completed" else f" ({s['status']})"
    return (f"{s['scenario']}: {s['rounds']} rounds{ended}, {acc}, {s['mb_sent']:.2f} MB sent, "
            f"{s['wall_s']:.1f} s\nrun folder: {s['run_dir']}")


def cmd_validate(args: argparse.Namespace) -> int:
    """Run every check ``fedkd simulate`` runs before the first round."""
    from fedkd.compose import load_scenario, prepare

    scn = load_scenario(args.scenario, _overrides(args))
    world, _ = prepare(scn)
    print(f"{scn.name}: valid — {scn.data.name}, {world.num_clients} clients, "
          f"{len(world.data.pool)} client samples, strategy {scn.strategy.name}, "
          f"{scn.rounds} rounds")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Print the client x class count table and write its heat-map."""
    from fedkd.compose import load_scenario
    from fedkd.record import plot_partition
    from fedkd.world import build_world

    scn = load_scenario(args.scenario, _overrides(args))
    world = build_world(scn)
    counts = world.counts
    width = max(5, len(str(counts.max())) + 1)
    header = "client  arch        " + "".join(f"{k:>{width}}" for k in range(counts.shape[1]))
    print(header + f"{'total':>8}")
    for cid, row in enumerate(counts):
        cells = "".join(f"{v:>{width}}" for v in row)
        print(f"{cid:>6}  {world.archs[cid]:<10}  {cells}{row.sum():>8}")
    png = Path(args.png or f"{scn.name}_partition.png")
    plot_partition(counts, png, f"{scn.name}: {scn.partition.name}")
    print(f"heat-map: {png}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run or resume a sweep; report failed runs (exit 1 if any)."""
    from fedkd.sweep import sweep

    root, runs, failures = sweep(args.scenario, args.grid, args.seeds, args.overrides,
                                 out=args.out, parallel=args.parallel,
                                 progress=not args.no_progress)
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    print(f"sweep: {len(runs) - len(failures)}/{len(runs)} runs completed\nsweep folder: {root}")
    return 1 if failures else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the comparison table and write the report files."""
    from fedkd.report import report

    try:
        _, out, text = report([Path(p) for p in args.paths], Path(args.out) if args.out else None,
                              target=args.target, baseline=args.baseline)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fedkd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(text, end="")
    print(f"report: {out / 'report.md'}")
    if args.baseline:
        print(f"paired comparison: {out / 'paired.md'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print every registry's names."""
    from fedkd.codecs import CODECS
    from fedkd.data.datasets import DATASETS
    from fedkd.data.partition import PARTITIONERS
    from fedkd.models import MODELS
    from strategies import STRATEGIES
    from strategies.topology import TOPOLOGIES
    from strategies.weighting import WEIGHTINGS

    for title, reg in (("datasets", DATASETS), ("partitioners", PARTITIONERS),
                       ("models", MODELS), ("strategies", STRATEGIES),
                       ("weightings", WEIGHTINGS), ("topologies", TOPOLOGIES),
                       ("codecs", CODECS)):
        names = reg.names()
        if reg is WEIGHTINGS:  # an upper bound (class attribute upper_bound) is not a method
            names = [f"{n} (upper bound: uses the true labels; not a method)"
                     if getattr(reg.get(n), "upper_bound", False) else n for n in names]
        print(f"{title}: {', '.join(names)}")
    return 0


COMMANDS = {"simulate": cmd_simulate, "validate": cmd_validate, "partition": cmd_partition,
            "sweep": cmd_sweep, "report": cmd_report, "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedkd`` console script."""
    from fedkd.engine.simulate import interrupt_on_sigterm

    args = build_parser().parse_args(argv)
    interrupt_on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except (ScenarioError, DataUnavailableError) as exc:
        print(f"fedkd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fedkd: interrupted; finished rounds are in the run folder", file=sys.stderr)
        return 130
    except AllClientsFailed as exc:
        print(f"fedkd: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
