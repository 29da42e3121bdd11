"""Bad input ends within seconds, with exit code 2, one line on stderr and no run folder.

Each row of :data:`CASES` is a scenario file (or a shipped scenario with overrides) and the
phrase the one-line error must contain; every case runs through ``fedkd simulate`` and
``fedkd validate`` in-process (``fedkd.cli.main``).
"""

from __future__ import annotations

import os
import socket
import urllib.error
from pathlib import Path

import pytest
import torch

from fedkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "scenarios" / "quickstart.yaml")
CIFAR = str(ROOT / "scenarios" / "noniid_cifar.yaml")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

#: (id, file content or None for a shipped scenario, scenario, overrides, phrase)
CASES = [
    ("empty", b"", None, (), "got an empty scenario (no keys); allowed: a YAML mapping"),
    ("comment", b"# rounds: 3\n", None, (), "got an empty scenario (no keys)"),
    ("binary", b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe\x00", None, (),
     "got bytes that are not UTF-8 text"),
    ("deep", b"a: " + b"[" * 5000 + b"]" * 5000, None, (), "got YAML nested too deep to read"),
    ("gpu", None, QUICKSTART, ("engine.client_resources.num_gpus=1",),
     "engine.client_resources.num_gpus: got 1.0; allowed: at most 0 (this machine has 0 GPUs)"),
    ("cpus", None, QUICKSTART, ("engine.client_resources.num_cpus=4096",),
     "engine.client_resources.num_cpus: got 4096.0; allowed: at most"),
    ("feddf-no-proxy", None, QUICKSTART, ("strategy.name=feddf", "data.public.fraction=0"),
     "data.public.fraction: got 0.0; allowed: a fraction > 0"),
    ("cifar-offline", None, CIFAR, ("rounds=1",),
     "cifar10: download failed ([Errno -2] Name or service not known); looked in"),
]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """torchvision's CIFAR downloads fail as they do without network; data root in tmp."""
    import torchvision.datasets

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    return tmp_path / "data"


@pytest.mark.parametrize("command", ["simulate", "validate"])
@pytest.mark.parametrize(("content", "scenario", "sets", "phrase"),
                         [pytest.param(*c[1:], id=c[0],
                                       marks=NO_GPU if c[0] == "gpu" else ())
                          for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      offline: Path, command: str, content: bytes | None,
                                      scenario: str | None, sets: tuple[str, ...],
                                      phrase: str) -> None:
    if content is not None:
        scenario = str(tmp_path / "bad.yaml")
        Path(scenario).write_bytes(content)
    assert scenario is not None
    out = tmp_path / "runs"
    args = [command, scenario, "--set", f"data.root={offline}", *sum((["--set", s] for s in sets),
                                                                    [])]
    if command == "simulate":
        args += ["--out", str(out), "--no-progress"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("fedkd: error: "), err
    assert phrase in err, err
    if content is not None:
        assert scenario in err  # the file is named
    assert not out.exists() or not any(out.rglob("*"))  # no run folder for a run never started
    assert not any(offline.glob(".cifar*")) if offline.exists() else True


def test_actors_that_cannot_be_placed_stop_the_run_without_a_folder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two actors of 3/4 of the machine's CPUs each: Ray can place one; fedkd stops in time."""
    cpus = 0.75 * (os.cpu_count() or 1)
    out = tmp_path / "runs"
    code = main(["simulate", QUICKSTART, "--out", str(out), "--no-progress",
                 "--set", "engine.actors=2", "--set", f"engine.client_resources.num_cpus={cpus}",
                 "--set", "engine.start_timeout=3"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fedkd: error: engine.client_resources: got ") and err.count("\n") == 1
    assert "what the cluster can place within 3 s (2 actors; the cluster has" in err
    assert not any(out.rglob("*"))
