"""Every strategy on CUDA: clients and server-side models on the GPU (``pytest -m gpu``).

Skipped where CUDA is absent. Each strategy runs two toy rounds in process with every client
on the GPU (``engine.client_resources.num_gpus``) and the server's models there too
(``server.device: cuda``); the accuracies must be finite and close to the CPU run's (GPU
kernels are not bit-identical to the CPU's).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from grids import run_in_process

from fedkd.compose import load_scenario
from fedkd.errors import ScenarioError
from fedkd.world import build_world
from strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
TOY = ["rounds=2", "clients.num=4", "clients.train.steps=3", "clients.train.batch_size=16",
       "partition.params.min_size=5", "engine.name=inline"]
SMALL = {"dml": ["public_size=40"], "peer_kd": ["public_size=40"], "dsfl": ["open_size=40"],
         "feddf": ["distill_steps=4", "eval_interval=2"],
         "fedbe": ["num_samples=2", "distill_steps=4"],
         "fedftg": ["rounds_inner=1", "gen_steps=2", "ft_steps=2", "batch_size=16",
                    "gen_width=8"],
         "fedgen": ["generator_steps=2"]}
CUDA = not torch.cuda.is_available()


def _accs(name: str, tmp: Path, extra: list[str]) -> list[float]:
    params = [f"strategy.params.{p}" for p in SMALL.get(name, [])]
    world = build_world(load_scenario(QUICKSTART, [*TOY, f"strategy.name={name}", *params,
                                                   *extra]))
    return [float(r.eval_metrics["acc"]) for r in run_in_process(world, tmp) if r.eval_metrics]


@pytest.mark.gpu
@pytest.mark.skipif(CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(STRATEGIES.names()))
def test_strategy_runs_on_cuda(name: str, tmp_path: Path) -> None:
    gpu = _accs(name, tmp_path / "gpu", ["engine.client_resources.num_gpus=0.25",
                                         "server.device=cuda"])
    cpu = _accs(name, tmp_path / "cpu", [])
    assert gpu and all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in gpu)
    assert gpu == pytest.approx(cpu, abs=0.1)


def test_server_device_auto_uses_cuda_when_present() -> None:
    world = build_world(load_scenario(QUICKSTART, ["server.device=auto"]))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert world.server_device.type == expected
    assert next(world.model_space().build("mlp").parameters()).device.type == expected
    assert build_world(load_scenario(QUICKSTART)).server_device.type == "cpu"


@pytest.mark.skipif(not CUDA, reason="only where CUDA is absent")
def test_server_device_cuda_without_cuda_is_a_one_line_error() -> None:
    with pytest.raises(ScenarioError, match=r"^server\.device: got 'cuda'"):
        load_scenario(QUICKSTART, ["server.device=cuda"])
