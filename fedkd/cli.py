"""The ``fedkd`` command: simulate | validate | partition | list.

Bad input (scenario keys, values, missing data) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    _scenario_args(sim)
    sim.add_argument("--out", help="folder for runs (default: the scenario's output.dir)")
    sim.add_argument("--engine", choices=["ray", "flower"], help="runtime (default: ray)")
    sim.add_argument("--ray-address", help="attach to a Ray cluster: auto or ray://host:port")
    sim.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1")
    sim.add_argument("--verbose", action="store_true", help="show Ray and Flower logs")
    sim.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    val = sub.add_parser("validate", help="check a scenario (and that its data loads)")
    _scenario_args(val)

    part = sub.add_parser("partition", help="print per-client class counts, write a heat-map")
    _scenario_args(part)
    part.add_argument("--png", help="heat-map path (default: <scenario name>_partition.png)")

    sub.add_parser("list", help="registered datasets, partitioners, models, strategies")
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
    from fedkd.engine.simulate import simulate
    from fedkd.scenario import load_scenario

    scn = load_scenario(args.scenario, _overrides(args))
    summary = simulate(scn, out=args.out, metrics_port=args.metrics_port,
                       verbose=args.verbose, progress=not args.no_progress)
    print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """The closing lines of ``fedkd simulate``."""
    acc = (f"final accuracy {s['final_acc']:.4f}, best {s['best_acc']:.4f}"
           if s["final_acc"] is not None else "no accuracy recorded")
    return (f"{s['scenario']}: {s['rounds']} rounds, {acc}, {s['mb_sent']:.2f} MB sent, "
            f"{s['wall_s']:.1f} s\nrun folder: {s['run_dir']}")


def cmd_validate(args: argparse.Namespace) -> int:
    """Parse the scenario and build its world (data and partition)."""
    from fedkd.scenario import load_scenario
    from fedkd.world import build_world

    scn = load_scenario(args.scenario, _overrides(args))
    world = build_world(scn)
    print(f"{scn.name}: valid — {scn.data.name}, {world.num_clients} clients, "
          f"{len(world.data.pool)} client samples, strategy {scn.strategy.name}, "
          f"{scn.rounds} rounds")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Print the client x class count table and write its heat-map."""
    from fedkd.record import plot_partition
    from fedkd.scenario import load_scenario
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


def cmd_list(args: argparse.Namespace) -> int:
    """Print every registry's names."""
    from fedkd.data.datasets import DATASETS
    from fedkd.data.partition import PARTITIONERS
    from fedkd.models import MODELS
    from strategies import STRATEGIES

    for title, reg in (("datasets", DATASETS), ("partitioners", PARTITIONERS),
                       ("models", MODELS), ("strategies", STRATEGIES)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


COMMANDS = {"simulate": cmd_simulate, "validate": cmd_validate, "partition": cmd_partition,
            "list": cmd_list}


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


if __name__ == "__main__":
    sys.exit(main())
