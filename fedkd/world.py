"""The simulated world a scenario describes: data splits, client partitions and client models.

Built once per process from the resolved scenario; every random choice takes the scenario's
seed, so the driver, Ray actors and Flower's own simulation workers build identical worlds.

With ``data.local_test_fraction > 0`` each client's partition is split into its training part
(:attr:`World.parts`: what it trains on, what its size and label counts report) and a local
test split from its own distribution (:attr:`World.local_tests`), on which personalised
accuracy is measured (:func:`local_summary`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from fedkd.data.base import Parts, TensorSplit
from fedkd.data.bundle import DataBundle, build_bundle
from fedkd.data.datasets import DATASETS
from fedkd.data.partition import PARTITIONERS, class_counts, split_local_test
from fedkd.ensemble import ModelSpace
from fedkd.models import assign_archs, build_model
from fedkd.scenario import Scenario, dump

#: Per-client splits a process keeps gathered (least recently used dropped first).
CLIENT_CACHE = 1024


@dataclass(frozen=True)
class World:
    """Everything a client or the server needs to know about the simulation.

    Attributes
    ----------
    scenario : Scenario
        The resolved scenario.
    data : DataBundle
        Client pool, test, validation and public splits.
    parts : Parts
        Indices into ``data.pool`` of each client's training data (one flat array and
        offsets for the whole population; ``parts[c]`` is client ``c``'s).
    archs : tuple[str, ...]
        Model architecture per client.
    local_tests : Parts
        Indices into ``data.pool`` of each client's local test split (never trained on);
        every one empty when ``data.local_test_fraction`` is 0.
    """

    scenario: Scenario
    data: DataBundle
    parts: Parts
    archs: tuple[str, ...]
    local_tests: Parts

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.parts)

    @cached_property
    def counts(self) -> np.ndarray:
        """Clients x classes label counts of the training parts."""
        return class_counts(self.data.pool.y.numpy(), list(self.parts), self.data.num_classes)

    @cached_property
    def groups(self) -> tuple[str, ...]:
        """Distinct architectures in scenario order."""
        return tuple(dict.fromkeys(s.arch for s in self.scenario.clients.models))

    def client_data(self, cid: int) -> TensorSplit:
        """The private training data of client ``cid`` (gathered once per process, the
        :data:`CLIENT_CACHE` most recently used kept)."""
        return self._cached("_client_data", cid, lambda: self.data.pool.subset(self.parts[cid]))

    @cached_property
    def has_local_tests(self) -> bool:
        """Whether clients hold local test splits (``data.local_test_fraction > 0``)."""
        return bool(self.local_tests.flat.size)

    def local_test_data(self, cid: int) -> TensorSplit:
        """The local test split of client ``cid`` (empty without local tests)."""
        return self._cached("_local_test_data", cid,
                            lambda: self.data.pool.subset(self.local_tests[cid]))

    def _cached(self, name: str, cid: int, gather: Callable[[], TensorSplit]) -> TensorSplit:
        """A per-client split from a bounded LRU cache: a population of 100,000 clients
        keeps at most :data:`CLIENT_CACHE` gathered splits, not one per client ever seen."""
        cache: OrderedDict[int, TensorSplit] = self.__dict__.setdefault(name, OrderedDict())
        if cid in cache:
            cache.move_to_end(cid)
            return cache[cid]
        split = cache[cid] = gather()
        if len(cache) > CLIENT_CACHE:
            cache.popitem(last=False)
        return split

    def model_params(self, arch: str) -> dict[str, Any]:
        """Builder keyword arguments of ``arch`` from the scenario."""
        for spec in self.scenario.clients.models:
            if spec.arch == arch:
                return dict(spec.params)
        return {}

    def model_space(self) -> ModelSpace:
        """How to build any of this world's architectures (for teacher ensembles), on the
        server's device."""
        return ModelSpace(self.data.input_shape, self.data.num_classes,
                          {s.arch: dict(s.params) for s in self.scenario.clients.models},
                          str(self.server_device))

    @property
    def server_device(self) -> torch.device:
        """Where server-side models live (``server.device``; ``auto``: CUDA when present)."""
        asked = self.scenario.server.device
        cuda = asked == "cuda" or (asked == "auto" and torch.cuda.is_available())
        return torch.device("cuda" if cuda else "cpu")

    def init_seed(self, arch: str) -> int:
        """Seed of the global initial model of architecture group ``arch``."""
        return self.scenario.seed * 1000 + self.groups.index(arch)

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
                        public_dataset=public_ds, public_size=d.public.size,
                        weight_fraction=d.weight_fraction)


def build_world(scn: Scenario) -> World:
    """Build the world of a scenario: data, partition and per-client architectures."""
    data = load_bundle(scn)
    partitioner = PARTITIONERS.get(scn.partition.name, "partition.name")
    labels = data.pool.y.numpy()
    parts = partitioner(labels, scn.clients.num, data.num_classes, scn.seed,
                        **scn.partition.params)
    parts, tests = split_local_test(labels, parts, scn.data.local_test_fraction, scn.seed)
    specs = [(m.arch, m.fraction) for m in scn.clients.models]
    archs = assign_archs(specs, scn.clients.num, scn.seed)
    return World(scenario=scn, data=data, parts=Parts.of(parts), archs=tuple(archs),
                 local_tests=Parts.of(tests))


#: Share of the clients whose mean accuracy is ``local-acc-worst10``.
WORST_SHARE = 0.1


def local_summary(accs: Sequence[float], losses: Sequence[float] = ()) -> dict[str, float]:
    """Personalised metrics from per-client accuracies on their local test splits.

    Every client counts once (unweighted); NaN entries (clients without a local test
    split) are left out.

    Parameters
    ----------
    accs : Sequence[float]
        One accuracy per client.
    losses : Sequence[float]
        One loss per client (optional).

    Returns
    -------
    dict[str, float]
        ``local-acc`` (mean), ``local-acc-worst10`` (mean of the ``max(1, floor(0.1 K))``
        lowest of K clients), ``local-acc-std`` (population standard deviation, ddof 0) and,
        with losses, ``local-loss`` (mean); empty when no client has a local test split.
    """
    a = np.asarray(accs, dtype=np.float64)
    a = np.sort(a[~np.isnan(a)])
    if not len(a):
        return {}
    worst = max(1, int(np.floor(WORST_SHARE * len(a) + 1e-9)))
    out = {"local-acc": float(a.mean()), "local-acc-worst10": float(a[:worst].mean()),
           "local-acc-std": float(a.std())}
    loss = np.asarray(losses, dtype=np.float64)
    loss = loss[~np.isnan(loss)]
    if len(loss):
        out["local-loss"] = float(loss.mean())
    return out


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
