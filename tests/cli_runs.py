"""End-to-end runs of ``fedkd simulate`` inside the test process, on the inline engine.

A CLI run in a fresh process starts Ray, which costs several seconds per test; the inline
engine runs the same scenario with the same results (``tests/test_cli.py`` checks that every
engine gives the same records), so tests of what a strategy or a scenario feature does run
here, and the tests of the engines themselves keep their own processes.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def simulate_inline(out: Path, *sets: str, scenario: Path = QUICKSTART) -> Path:
    """``fedkd simulate scenario --set engine.name=inline --set ...`` in this process; the
    run folder (the only one under ``out``)."""
    from fedkd.cli import main

    args = ["simulate", str(scenario), "--out", str(out), "--no-progress",
            "--set", "engine.name=inline"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    (run,) = [p for p in out.glob("*/*") if p.is_dir()]
    return run
