"""One contract over every registered strategy (a new algorithm is covered by its name).

- it is a Flower message-API strategy, found by name;
- an unknown or bad parameter is reported with its YAML key path;
- two rounds on toy data run in process through fedkd's runner, with finite accuracy, and
  the same scenario and seed give the same metrics;
- where a strategy has an off-switch, switching it off gives its base algorithm exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.serverapp.strategy import Strategy
from grids import run_in_process

import strategies
from fedkd.compose import build_strategy, from_dict, load_scenario
from fedkd.errors import ScenarioError
from fedkd.world import build_world
from strategies import STRATEGIES, get_strategy

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
BUILT_IN = ["dml", "dpsgd", "dsfl", "fd", "fedavg", "fedbe", "feddf", "fedftg", "fedgen",
            "fedgkd", "fedmd", "fedntd", "fedproto", "fml", "local", "peer_kd"]
ALL = sorted(set(STRATEGIES.names()))  # imports every module of the package

#: Tiny runs: 4 clients, 2 rounds, a few local steps.
TOY = ["rounds=2", "clients.num=4", "clients.train.steps=3", "clients.train.batch_size=16",
       "partition.params.min_size=5"]

#: Parameters that keep each strategy's server-side work small on toy data.
SMALL: dict[str, dict[str, Any]] = {
    "dml": {"public_size": 40},
    "dsfl": {"open_size": 40},
    "feddf": {"distill_steps": 4, "eval_interval": 2},
    "fedbe": {"num_samples": 2, "distill_steps": 4},
    "fedftg": {"rounds_inner": 1, "gen_steps": 2, "ft_steps": 2, "batch_size": 16,
               "gen_width": 8},
    "fedgen": {"generator_steps": 2},
    "fedmd": {},
    "peer_kd": {"public_size": 40},
}

#: Strategies with a teacher ensemble, and its size on the toy run (uniform weights).
ENSEMBLES = {"dml": 3.0, "fedbe": 7.0, "feddf": 4.0, "fedftg": 4.0, "fedmd": 4.0,
             "peer_kd": 3.0}

#: Off-switch parameters and the strategy they must then equal.
OFF_SWITCH: dict[str, tuple[dict[str, Any], str]] = {
    "feddf": ({"distill_steps": 0}, "fedavg"),
    "fedftg": ({"rounds_inner": 0}, "fedavg"),
    "fedntd": ({"beta": 0.0}, "fedavg"),
    "fedgkd": ({"gamma": 0.0}, "fedavg"),
    "fedbe": ({"num_samples": 0, "use_clients": False, "distill_steps": 0}, "fedavg"),
    "fd": ({"beta": 0.0}, "local"),
    "fedproto": ({"lamda": 0.0}, "local"),
    "dsfl": ({"distill_epochs": 0}, "local"),
}


def _params(name: str, extra: dict[str, Any] | None = None) -> list[str]:
    return [f"strategy.name={name}",
            *(f"strategy.params.{k}={v}" for k, v in {**SMALL.get(name, {}),
                                                      **(extra or {})}.items())]


def _run(tmp: Path, overrides: list[str]) -> list[Any]:
    world = build_world(load_scenario(QUICKSTART, [*TOY, *overrides]))
    return run_in_process(world, tmp)


def _accs(results: list[Any]) -> list[float]:
    return [float(r.eval_metrics["acc"]) for r in results if r.eval_metrics]


def test_built_in_strategies_are_registered() -> None:
    assert set(BUILT_IN) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_is_a_flower_strategy(name: str) -> None:
    assert issubclass(get_strategy(name), Strategy)


@pytest.mark.parametrize("name", ALL)
def test_unknown_param_names_the_key(name: str) -> None:
    with pytest.raises(ScenarioError, match=r"strategy\.params\.no_such_param"):
        from_dict({"strategy": {"name": name, "params": {"no_such_param": 1}}})


@pytest.mark.parametrize("name", ALL)
def test_two_toy_rounds_are_deterministic(name: str, tmp_path: Path) -> None:
    """Also: the teacher diagnostics (on in the first run, off in the second) change
    nothing, and every teacher ensemble records them."""
    world = build_world(load_scenario(QUICKSTART, [*TOY, *_params(name)]))
    strategy = build_strategy(world.scenario, world)
    first = run_in_process(world, tmp_path / "a", strategy)
    again = _run(tmp_path / "b", [*_params(name), "server.teacher_diagnostics=false"])
    if name in ENSEMBLES:
        for rnd in (1, 2):
            diag = strategy.teacher_log.metrics[rnd]
            assert 0.0 <= diag["teach-ens-acc"] <= 1.0 and 0.0 <= diag["teach-w-entropy"] <= 1
            assert diag["teach-eff-k"] == pytest.approx(ENSEMBLES[name])
    accs = _accs(first)
    assert len(first) == 2 and accs and all(0.0 <= a <= 1.0 for a in accs)
    assert all(r.train_metrics.get("failures", 0) == 0 for r in first)
    assert accs == _accs(again)
    for a, b in zip(first, again, strict=True):
        assert {k: v for k, v in a.train_metrics.items() if not math.isnan(v)} == {
            k: v for k, v in b.train_metrics.items() if not math.isnan(v)}


@pytest.mark.parametrize("name", sorted(OFF_SWITCH))
def test_off_switch_gives_the_base_algorithm(name: str, tmp_path: Path) -> None:
    params, base = OFF_SWITCH[name]
    off = _run(tmp_path / "off", _params(name, params))
    ref = _run(tmp_path / "ref", _params(base))
    assert _accs(off) == _accs(ref)


def test_a_strategy_file_dropped_into_strategies_is_found_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "toykd.py").write_text(
        "from strategies import STRATEGIES\n"
        "from strategies.fedavg import FedAvg\n\n\n"
        "@STRATEGIES.register('toykd')\n"
        "class ToyKD(FedAvg):\n"
        "    def __init__(self, *args, alpha: float = 0.5, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        self.alpha = alpha\n")
    monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
    try:
        scn = from_dict({"strategy": {"name": "toykd", "params": {"alpha": 0.25}}})
        assert get_strategy("toykd").__name__ == "ToyKD" and scn.strategy.name == "toykd"
    finally:
        STRATEGIES._items.pop("toykd", None)
