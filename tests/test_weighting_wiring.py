"""The weightings that need more than logits, wired end to end on toy runs: per-client
coefficients (``kt_pfl`` in DML and FedMD), client-uploaded certainty scores (``certainty``
in FedDF), label-using weightings in FedMD and DML (client logits on the weighting split),
the simulator's truth for ``oracle``, and the strategies that cannot feed a weighting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from grids import run_in_process

from fedkd.checkpoint import load_strategy_state, strategy_state
from fedkd.compose import build_strategy, load_scenario
from fedkd.errors import ScenarioError
from fedkd.world import build_world

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
TOY = ["rounds=2", "clients.num=4", "clients.train.steps=3", "clients.train.batch_size=16",
       "partition.params.min_size=5"]
SMALL = {"dml": ["strategy.params.public_size=40"],
         "feddf": ["strategy.params.distill_steps=4", "strategy.params.eval_interval=2"],
         "fedmd": ["strategy.params.alignment_size=40"]}


def _run(tmp: Path, name: str, *overrides: str) -> tuple[Any, list[Any]]:
    world = build_world(load_scenario(QUICKSTART, [*TOY, f"strategy.name={name}",
                                                   *SMALL.get(name, []), *overrides]))
    strategy = build_strategy(world.scenario, world)
    return strategy, run_in_process(world, tmp, strategy)


def _weights(strategy: Any, rnd: int) -> list[float]:
    return [r["weight"] for r in strategy.teacher_log.teacher_weights(rnd)]


@pytest.mark.parametrize("name", ["dml", "fedmd"])
def test_kt_pfl_learns_coefficients_and_checkpoints_them(name: str, tmp_path: Path) -> None:
    strategy, results = _run(tmp_path, name, "strategy.params.weighting=kt_pfl")
    assert len(results) == 2
    state = strategy.weigh.state_dict()
    assert len(state["student"]) > 0  # every student's row was updated
    # the learned rows are no longer the uniform prior
    assert max(_weights(strategy, 2)) - min(_weights(strategy, 2)) > 1e-4
    saved = strategy_state(strategy)
    fresh = build_strategy(strategy.world.scenario, strategy.world)
    fresh.bind(strategy.world)
    load_strategy_state(fresh, saved)
    for key, value in state.items():
        assert torch.equal(fresh.weigh.state_dict()[key], value), key


def test_certainty_clients_upload_scores_feddf_weighs_by_them(tmp_path: Path) -> None:
    base, ref = _run(tmp_path / "u", "feddf")
    strategy, results = _run(tmp_path / "c", "feddf", "strategy.params.weighting=certainty",
                             "strategy.params.weighting_params.steps=20")
    n_proxy = len(strategy.world.data.public)
    for a, b in zip(results, ref, strict=True):
        up = sum(t.up for t in a.traffic.values())
        up_ref = sum(t.up for t in b.traffic.values())
        assert up - up_ref >= 4 * 4 * n_proxy  # four clients, N float32 scores each
    w = _weights(strategy, 1)
    assert sum(w) == pytest.approx(1.0) and max(w) - min(w) > 1e-3
    assert strategy.teacher_log.metrics[1]["teach-eff-k"] < 4.0


@pytest.mark.parametrize("name", ["dml", "fedmd"])
def test_label_using_weighting_fits_on_client_logits_of_the_weighting_split(
        name: str, tmp_path: Path) -> None:
    strategy, results = _run(tmp_path, name, "strategy.params.weighting=validation",
                             "strategy.params.weighting_params.drop_below_chance=false",
                             "data.weight_fraction=0.05")
    _, ref = _run(tmp_path / "ref", name, "data.weight_fraction=0.05")
    split = len(strategy.world.data.weight)
    for a, b in zip(results, ref, strict=True):  # each client uploads (split, C) logits more
        extra = sum(t.up for t in a.traffic.values()) - sum(t.up for t in b.traffic.values())
        assert extra >= 4 * split * 10 * 4
    w = _weights(strategy, 2)
    assert max(w) - min(w) > 1e-6  # validation accuracies tell the teachers apart
    with pytest.raises(ScenarioError) as err:
        _run(tmp_path / "none", name, "strategy.params.weighting=learned",
             "data.weight_fraction=0", "data.val_fraction=0")
    assert err.value.path == "data.weight_fraction"


def test_oracle_reads_the_simulators_truth(tmp_path: Path) -> None:
    strategy, _ = _run(tmp_path, "feddf", "strategy.params.weighting=oracle")
    diag = strategy.teacher_log.metrics[2]
    assert diag["teach-w-auc"] > 0.9 and diag["teach-ens-acc"] >= diag["teach-acc-best"]


@pytest.mark.parametrize(("name", "weighting"), [("feddf", "kt_pfl"), ("fedgen", "kt_pfl"),
                                                 ("dml", "certainty"), ("fedmd", "certainty"),
                                                 ("fedftg", "certainty"),
                                                 ("fedgen", "validation")])
def test_unsupported_weighting_is_a_scenario_error(name: str, weighting: str,
                                                   tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as err:
        _run(tmp_path, name, f"strategy.params.weighting={weighting}",
             "strategy.params.label_weighting=false" if name in ("fedftg", "fedgen")
             else "seed=0")
    assert err.value.path == "strategy.params.weighting"


def test_era_sharpens_fedmds_consensus() -> None:
    from fedkd.distill import era, weighted_logits
    from strategies.fedmd import consensus
    from strategies.weighting import TeacherContext, make_weighting

    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])
    ctx = TeacherContext(torch.ones(2), torch.ones(2, 2), cids=torch.tensor([0, 1]))
    target, w = consensus(logits, make_weighting("uniform", {"era_temperature": 0.1}), ctx)
    plain = weighted_logits(logits, w)
    assert torch.allclose(target, torch.log(era(torch.softmax(plain, 1), 0.1)))


@pytest.mark.parametrize("name", ["dml"])
def test_era_sharpens_the_targets_of_any_ensemble(name: str, tmp_path: Path) -> None:
    _, plain = _run(tmp_path / "p", name, "strategy.params.weighting=confidence")
    strategy, sharp = _run(tmp_path / "s", name, "strategy.params.weighting=confidence",
                           "strategy.params.weighting_params.era_temperature=0.05")
    assert strategy.weigh.era_temperature == 0.05
    # the same weights, different targets: training goes another way after round 1
    assert _weights(strategy, 1) == pytest.approx(
        [r["weight"] for r in _run(tmp_path / "w", name,
                                   "strategy.params.weighting=confidence")[0]
         .teacher_log.teacher_weights(1)])
    assert [r.eval_metrics.get("acc") for r in sharp] != [r.eval_metrics.get("acc")
                                                          for r in plain]
