"""What README promises of every strategy: a Flower message-API strategy, found by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.serverapp.strategy import Strategy

import strategies
from strategies import STRATEGIES, get_strategy

BUILT_IN = ["dml", "fedavg", "feddf", "fedftg", "fedgen", "fedmd", "fml", "local"]


def test_every_registered_strategy_is_a_flower_strategy() -> None:
    names = STRATEGIES.names()  # imports every module of the package
    assert set(BUILT_IN) <= set(names)
    for name in names:
        assert issubclass(get_strategy(name), Strategy), name


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
        from fedkd.compose import from_dict

        scn = from_dict({"strategy": {"name": "toykd", "params": {"alpha": 0.25}}})
        assert get_strategy("toykd").__name__ == "ToyKD" and scn.strategy.name == "toykd"
    finally:
        STRATEGIES._items.pop("toykd", None)
