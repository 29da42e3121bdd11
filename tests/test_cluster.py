"""The cluster/ folder: every file parses, the cluster configs have a head, a CPU and a GPU
group and install the pinned torch, Prometheus scrapes loopback only, and the Grafana
dashboard queries only metrics and labels that fedkd exports."""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedkd.record import PROM_LABELS, PromExporter

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PINS = dict(re.findall(r'"(torch|torchvision)==([^"]+)"',
                       (ROOT / "pyproject.toml").read_text()))
PIP_INSTALL_E = re.compile(r"pip install (-\S+ )*-e ['\"]?\.(\[[a-z,]+\])?['\"]?(\s|$)")


def _yaml(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _commands(config: dict[str, Any]) -> str:
    """All shell commands of a launcher config, as one text."""
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    return "\n".join(c for k in keys for c in config.get(k) or [])


def _installs_pinned_torch(text: str) -> bool:
    return all(f"{pkg}=={version}" in text for pkg, version in PINS.items())


def test_pins_are_found() -> None:
    assert set(PINS) == {"torch", "torchvision"}


def test_every_cluster_file_parses() -> None:
    files = sorted(p.name for p in CLUSTER.iterdir() if p.is_file())
    assert files == ["Dockerfile", "Dockerfile.dockerignore", "README.md",
                     "grafana-dashboard.json", "kuberay-raycluster.yaml", "prometheus.yml",
                     "ray-cluster.yaml"]  # a new file needs a check here
    for name in files:
        text = (CLUSTER / name).read_text()
        if name.endswith((".yaml", ".yml")):
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
            assert docs and all(isinstance(d, dict) for d in docs), name
        elif name.endswith(".json"):
            assert isinstance(json.loads(text), dict)
        else:
            assert text.strip(), name


def test_dockerfile_installs_fedkd_as_the_readme_does() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms, "no FROM"
    base = re.search(r"FROM python:\$\{PYTHON_VERSION\}|FROM python:(\d+)\.(\d+)", froms[0])
    assert base, froms[0]
    version = re.search(r"ARG PYTHON_VERSION=(\d+)\.(\d+)", text)
    assert version and (int(version[1]), int(version[2])) >= (3, 11)  # Ray needs 3.11+
    assert PIP_INSTALL_E.search(text), "no `pip install -e .`"
    assert _installs_pinned_torch(text)
    assert "TORCH_VARIANT" in text and "dataset-fashion-mnist" in text
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".*", "runs"} <= set(ignored)  # .venv, .git and run folders stay out


def _launcher_type_resources() -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    config = _yaml("ray-cluster.yaml")
    types = config["available_node_types"]
    return config, {name: t["resources"] for name, t in types.items()}


def test_ray_launcher_has_head_cpu_and_gpu_types_and_installs_fedkd() -> None:
    config, resources = _launcher_type_resources()
    head = config["head_node_type"]
    assert head in resources
    workers = {n: r for n, r in resources.items() if n != head}
    cpu = [n for n, r in workers.items() if r.get("CPU", 0) > 0 and not r.get("GPU")]
    gpu = [n for n, r in workers.items() if r.get("GPU", 0) >= 1]
    assert cpu and gpu, resources
    types = config["available_node_types"]
    for name in cpu + gpu:
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert config["provider"]["type"] in {"aws", "local"}
    assert "." in config["file_mounts"].values()  # this checkout goes to every node
    commands = _commands(config)
    assert PIP_INSTALL_E.search(commands) and _installs_pinned_torch(commands)
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands


def test_ray_launcher_config_is_valid_for_ray() -> None:
    """Ray's own schema and default filling (offline), where Ray's launcher is installed."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    config = util.prepare_config(_yaml("ray-cluster.yaml"))
    util.validate_config(config)


def test_kuberay_manifest_has_head_cpu_and_gpu_groups() -> None:
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()))
    clusters = [d for d in docs if d and d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    rc = clusters[0]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and head[0]["image"].split(":")[0].endswith("fedkd")

    def limits(group: dict[str, Any]) -> dict[str, Any]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"].split(":")[0].endswith("fedkd")  # built from cluster/Dockerfile
        return container["resources"]["limits"]

    groups = {g["groupName"]: limits(g) for g in spec["workerGroupSpecs"]}
    gpu = [n for n, lim in groups.items() if lim.get("nvidia.com/gpu") == 1]
    cpu = [n for n, lim in groups.items() if "nvidia.com/gpu" not in lim]
    assert gpu and cpu, groups
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_ray_version_is_the_installed_ray() -> None:
    try:
        installed = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("ray is not installed (Python < 3.11)")
    (rc,) = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text())
             if d and d.get("kind") == "RayCluster"]
    assert rc["spec"]["rayVersion"] == installed


def test_prometheus_scrapes_loopback_only() -> None:
    config = _yaml("prometheus.yml")
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]]
    assert targets
    for target in targets:
        host, _, port = target.rpartition(":")
        assert ipaddress.ip_address(host).is_loopback, target
        assert 0 < int(port) < 65536
    assert all(job.get("metrics_path", "/metrics") == "/metrics"
               for job in config["scrape_configs"])


def _exported() -> tuple[set[str], set[str]]:
    """Sample names and label names a live exporter serves."""
    exporter = PromExporter(0, scenario="s", run="r", strategy="x")
    try:
        exporter.update(1, 0.5, 1.0, 10, 5)
        samples = [s for m in exporter.registry.collect() for s in m.samples]
    finally:
        exporter.close()
    return {s.name for s in samples}, {k for s in samples for k in s.labels}


def _dashboard_exprs() -> list[str]:
    dash = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_queries_only_exported_metrics_and_labels() -> None:
    names, labels = _exported()
    assert labels == set(PROM_LABELS)
    exprs = _dashboard_exprs()
    queried = {m for e in exprs for m in re.findall(r"fedkd_[a-z_]+", e)}
    assert queried and queried <= names, queried - names
    # accuracy, loss, round and both traffic counters each have a panel
    assert {"fedkd_test_accuracy", "fedkd_test_loss", "fedkd_round",
            "fedkd_bytes_down_total", "fedkd_bytes_up_total"} <= queried
    matchers = {k for e in exprs for k in re.findall(r"([a-z_]+)\s*=~?\s*\"", e)}
    assert matchers and matchers <= labels, matchers - labels


def test_dashboard_is_templated_by_the_labels() -> None:
    dash = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert set(PROM_LABELS) <= set(variables)
    for label in PROM_LABELS:
        assert re.search(rf"label_values\(.*,\s*{label}\)", variables[label]["definition"])
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for label in PROM_LABELS:
                assert f'{label}=~"${label}"' in target["expr"], (panel["title"], label)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
