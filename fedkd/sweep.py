"""``fedkd sweep``: run a grid of scenario overrides x seeds into one resumable sweep folder.

Each run is a separate ``fedkd simulate`` process writing to
``<sweep>/<config>/seed-<s>/``; a run whose ``summary.json`` says ``completed`` is skipped
when the same sweep is started again, so an interrupted sweep resumes where it stopped.
Runs go ``parallel`` at a time (each one's Ray actors share the machine).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from fedkd.compose import load_scenario
from fedkd.errors import ScenarioError
from fedkd.scenario import Scenario, load_raw


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: a grid point and a seed."""

    config: str
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["a.b=1,2", "c=x,y"]`` -> ``{"a.b": [1, 2], "c": ["x", "y"]}`` (values typed by YAML)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ScenarioError("--grid", item, "KEY.PATH=V1,V2,...")
        key, values = item.split("=", 1)
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    return grid


def parse_seeds(text: str | None) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    if not text:
        return []
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ScenarioError("--seeds", text, "comma-separated integers") from None


def _label(key: str, keys: Sequence[str]) -> str:
    short = key.rsplit(".", 1)[-1]
    return short if sum(k.rsplit(".", 1)[-1] == short for k in keys) == 1 else key


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def plan(scn: Scenario, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int],
         root: Path) -> list[SweepRun]:
    """Every grid point x seed, with its overrides and run folder."""
    keys = list(grid)
    seeds = list(seeds) or [scn.seed]
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        sets = tuple(f"{k}={_value_text(v)}" for k, v in zip(keys, values, strict=True))
        config = ",".join(f"{_label(k, keys)}={_value_text(v)}"
                          for k, v in zip(keys, values, strict=True)) or "base"
        safe = config.replace("/", "_").replace(" ", "")
        runs += [SweepRun(config, sets, s, root / safe / f"seed-{s}") for s in seeds]
    return runs


def default_root(scn: Scenario, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int],
                 overrides: Sequence[str], out: str | None) -> Path:
    """A stable sweep folder: the same sweep command maps to the same folder (to resume)."""
    key = json.dumps({"grid": grid, "seeds": list(seeds), "set": list(overrides)},
                     sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return Path(out or scn.output.dir) / scn.name / f"sweep-{digest}"


def is_done(run_dir: Path) -> bool:
    """Whether a run folder holds a completed run."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    try:
        return json.loads(summary.read_text()).get("status") == "completed"
    except json.JSONDecodeError:
        return False


def check_point(scenario: str, overrides: Sequence[str], point: Sequence[str]) -> None:
    """Validate one grid point: the base overrides and all of the point's, together.

    Axes are never checked one by one against the base scenario: a value that is only valid
    beside another axis's value (``weighting`` beside ``strategy.name=feddf``) is valid.

    Raises
    ------
    ScenarioError
        Naming the grid point, e.g. ``grid point name=fedavg,weighting=entropy: ...``.
    """
    try:
        load_scenario(scenario, [*overrides, *point])
    except ScenarioError as exc:
        where = ",".join(point)
        raise ScenarioError(f"grid point {where}: {exc.path}", exc.value, exc.allowed) from None


def _run_one(scenario: str, base: Sequence[str], run: SweepRun) -> tuple[SweepRun, int, str]:
    if run.run_dir.exists():
        shutil.rmtree(run.run_dir)
    args = [sys.executable, "-m", "fedkd.cli", "simulate", scenario, "--no-progress",
            "--run-dir", str(run.run_dir)]
    for s in (*base, *run.overrides, f"seed={run.seed}"):
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True)
    return run, proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep command will run: its folder, grid, seeds and runs."""

    root: Path
    grid: dict[str, list[Any]]
    seeds: list[int]
    runs: list[SweepRun]


def resolve(scenario: str, grid_items: Sequence[str] = (), seeds_text: str | None = None,
            overrides: Sequence[str] = (), out: str | None = None) -> SweepPlan:
    """The sweep folder and runs of a sweep command, without running anything.

    ``--grid`` / ``--seeds`` win over the scenario's ``sweep: {grid, seeds}`` block; the
    default folder is ``<output.dir>/<scenario>/sweep-<hash of grid, seeds and --set>``.
    """
    scn = load_scenario(scenario, overrides)
    grid = parse_grid(grid_items) or {k: list(v) for k, v in scn.sweep.grid.items()}
    seeds = parse_seeds(seeds_text) or list(scn.sweep.seeds)
    root = Path(out) if out else default_root(scn, grid, seeds, overrides, None)
    return SweepPlan(root, grid, seeds, plan(scn, grid, seeds, root))


def sweep(scenario: str, grid_items: Sequence[str] = (), seeds_text: str | None = None,
          overrides: Sequence[str] = (), out: str | None = None, parallel: int = 1,
          progress: bool = True) -> tuple[Path, list[SweepRun], list[str]]:
    """Run (or resume) a sweep.

    Parameters
    ----------
    scenario : str
        Scenario YAML; its optional ``sweep: {grid: {key: [values]}, seeds: [...]}`` block
        is used where ``--grid`` / ``--seeds`` are not given.
    grid_items : Sequence[str]
        ``KEY=V1,V2`` grid axes.
    seeds_text : str, optional
        ``"0,1,2"``.
    overrides : Sequence[str]
        ``--set`` assignments applied to every run.
    out : str, optional
        Sweep folder (default: ``<output.dir>/<scenario>/sweep-<hash>``).
    parallel : int
        Runs at a time.
    progress : bool
        Show a progress bar over runs.

    Returns
    -------
    tuple
        The sweep folder, all runs, and one line per failed run.
    """
    todo_plan = resolve(scenario, grid_items, seeds_text, overrides, out)
    root, grid, seeds, runs = todo_plan.root, todo_plan.grid, todo_plan.seeds, todo_plan.runs
    for point in dict.fromkeys(r.overrides for r in runs):  # each grid point as a whole
        check_point(scenario, overrides, point)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({
        "scenario": str(scenario), "raw": load_raw(scenario), "set": list(overrides),
        "grid": grid, "seeds": seeds,
        "runs": [{"config": r.config, "seed": r.seed, "overrides": list(r.overrides),
                  "dir": str(r.run_dir.relative_to(root))} for r in runs]}, indent=2,
        default=str))
    todo = [r for r in runs if not is_done(r.run_dir)]
    failures: list[str] = []
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="sweep", unit="run",
               disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for run, code, last in pool.map(lambda r: _run_one(scenario, overrides, r), todo):
            if code != 0:
                failures.append(f"{run.config} seed {run.seed}: exit {code}: {last}")
            bar.update(1)
    bar.close()
    return root, runs, failures
