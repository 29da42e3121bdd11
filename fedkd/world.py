"""The simulated world a scenario describes: data splits, client partitions and client models.

Built once per process from the resolved scenario; every random choice takes the scenario's
seed, so the driver, Ray actors and Flower's own simulation workers build identical worlds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from fedkd.data.base import TensorSplit
from fedkd.data.bundle import DataBundle, build_bundle
from fedkd.data.datasets import DATASETS
from fedkd.data.partition import PARTITIONERS, class_counts
from fedkd.ensemble import ModelSpace
from fedkd.models import assign_archs, build_model
from fedkd.scenario import Scenario, dump


@dataclass(frozen=True)
class World:
    """Everything a client or the server needs to know about the simulation.

    Attributes
    ----------
    scenario : Scenario
        The resolved scenario.
    data : DataBundle
        Client pool, test, validation and public splits.
    parts : tuple[np.ndarray, ...]
        Indices into ``data.pool`` per client.
    archs : tuple[str, ...]
        Model architecture per client.
    """

    scenario: Scenario
    data: DataBundle
    parts: tuple[np.ndarray, ...]
    archs: tuple[str, ...]

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.parts)

    @cached_property
    def counts(self) -> np.ndarray:
        """Clients x classes label counts."""
        return class_counts(self.data.pool.y.numpy(), list(self.parts), self.data.num_classes)

    @cached_property
    def groups(self) -> tuple[str, ...]:
        """Distinct architectures in scenario order."""
        return tuple(dict.fromkeys(s.arch for s in self.scenario.clients.models))

    def client_data(self, cid: int) -> TensorSplit:
        """The private training data of client ``cid`` (gathered once per process)."""
        cache = self.__dict__.setdefault("_client_data", {})
        if cid not in cache:
            cache[cid] = self.data.pool.subset(self.parts[cid])
        return cache[cid]

    def model_params(self, arch: str) -> dict[str, Any]:
        """Builder keyword arguments of ``arch`` from the scenario."""
        for spec in self.scenario.clients.models:
            if spec.arch == arch:
                return dict(spec.params)
        return {}

    def model_space(self) -> ModelSpace:
        """How to build any of this world's architectures (for teacher ensembles)."""
        return ModelSpace(self.data.input_shape, self.data.num_classes,
                          {s.arch: dict(s.params) for s in self.scenario.clients.models})

    def new_model(self, arch: str, seed: int) -> torch.nn.Module:
        """A freshly initialised model of ``arch`` shaped for this dataset."""
        return build_model(arch, self.data.input_shape, self.data.num_classes, seed=seed,
                           **self.model_params(arch))


def fingerprint(scn: Scenario) -> str:
    """A short stable hash of the resolved scenario (identifies a world across processes)."""
    return hashlib.sha256(dump(scn).encode()).hexdigest()[:16]


def load_bundle(scn: Scenario) -> DataBundle:
    """Load the dataset(s) and carve the validation and public splits."""
    d = scn.data
    dataset = DATASETS.get(d.name, "data.name")(d.root, d.download, scn.seed, **d.params)
    public_ds = None
    if d.public.dataset is not None:
        public_ds = DATASETS.get(d.public.dataset, "data.public.dataset")(
            d.root, d.download, scn.seed)
    return build_bundle(dataset, seed=scn.seed, val_fraction=d.val_fraction,
                        public_fraction=d.public.fraction, public_labeled=d.public.labeled,
                        public_dataset=public_ds, public_size=d.public.size)


def build_world(scn: Scenario) -> World:
    """Build the world of a scenario: data, partition and per-client architectures."""
    data = load_bundle(scn)
    partitioner = PARTITIONERS.get(scn.partition.name, "partition.name")
    parts = partitioner(data.pool.y.numpy(), scn.clients.num, data.num_classes, scn.seed,
                        **scn.partition.params)
    specs = [(m.arch, m.fraction) for m in scn.clients.models]
    archs = assign_archs(specs, scn.clients.num, scn.seed)
    return World(scenario=scn, data=data, parts=tuple(parts), archs=tuple(archs))


_CACHE: dict[str, World] = {}


def cached_world(scn: Scenario) -> World:
    """The world of ``scn``, built at most once per process."""
    key = fingerprint(scn)
    if key not in _CACHE:
        _CACHE[key] = build_world(scn)
    return _CACHE[key]


def install_world(world: World) -> None:
    """Make an already-built world (e.g. from Ray's object store) this process's cached one."""
    _CACHE[fingerprint(world.scenario)] = world
