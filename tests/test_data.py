"""Dataset loaders and bundle construction."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkd.data.base import LoadedDataset, TensorSplit
from fedkd.data.bundle import build_bundle
from fedkd.data.datasets import DATASETS, read_idx
from fedkd.errors import DataUnavailableError, ScenarioError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist "
    "(apt-get install dataset-fashion-mnist)",
)


def _write_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    """Write a fake cifar-10-batches-py folder; return the images of data_batch_1."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = np.empty(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(b + i) % 10 for i in range(per_batch)]
        with (folder / name).open("wb") as fh:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, fh)
        if b == 0:
            first = data
    return first


# ----------------------------------------------------------------------------- TensorSplit


def test_tensor_split_subset_and_len() -> None:
    split = TensorSplit(torch.arange(10, dtype=torch.float32)[:, None], torch.arange(10))
    sub = split.subset(np.array([7, 2]))
    assert len(split) == 10 and len(sub) == 2
    assert sub.y.tolist() == [7, 2]
    assert split.subset(torch.tensor([1])).x.item() == 1.0


def test_registry_names_and_signatures() -> None:
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "fashion_mnist", "synthetic"]
    for name in DATASETS.names():
        params = list(inspect.signature(DATASETS.get(name)).parameters)
        assert params[:3] == ["root", "download", "seed"]


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_normalization() -> None:
    ds = DATASETS.get("digits")(None, False, 0)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.train) == 1437 and len(ds.test) == 360
    assert ds.train.x.shape == (1437, 1, 8, 8) and ds.train.x.dtype == torch.float32
    assert ds.train.y.dtype == torch.int64
    assert abs(ds.train.x.mean().item()) < 1e-4
    assert abs(ds.train.x.std().item() - 1.0) < 1e-3
    assert torch.bincount(ds.test.y).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]


def test_digits_seeded_split() -> None:
    a = DATASETS.get("digits")(None, False, 1, test_fraction=0.5)
    b = DATASETS.get("digits")(None, False, 1, test_fraction=0.5)
    c = DATASETS.get("digits")(None, False, 2, test_fraction=0.5)
    assert len(a.test) == 899
    assert torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.train.y, c.train.y)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, "x"])
def test_digits_bad_fraction(bad: object) -> None:
    with pytest.raises(ScenarioError) as err:
        DATASETS.get("digits")(None, False, 0, test_fraction=bad)
    assert err.value.path == "data.params.test_fraction"


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_normalization() -> None:
    ds = DATASETS.get("synthetic")(None, False, 3, num_classes=4, num_features=7,
                                   train_size=400, test_size=100)
    assert ds.input_shape == (7,) and ds.num_classes == 4
    assert ds.train.x.shape == (400, 7) and ds.test.x.shape == (100, 7)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert torch.bincount(ds.train.y).tolist() == [100, 100, 100, 100]
    assert torch.allclose(ds.train.x.mean(0), torch.zeros(7), atol=1e-5)
    assert torch.allclose(ds.train.x.std(0, unbiased=False), torch.ones(7), atol=1e-4)


def test_synthetic_reproducible_and_separable() -> None:
    load = DATASETS.get("synthetic")
    a, b, c = load(None, False, 5), load(None, False, 5), load(None, False, 6)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)
    far = load(None, False, 5, separation=20.0)
    centers = torch.stack([far.train.x[far.train.y == k].mean(0) for k in range(10)])
    nearest = torch.cdist(far.test.x, centers).argmin(1)
    assert (nearest == far.test.y).float().mean().item() > 0.99


@pytest.mark.parametrize(
    ("key", "value"),
    [("num_classes", 1), ("num_features", 0), ("train_size", 3), ("test_size", 0),
     ("separation", -1.0), ("num_classes", 2.5)],
)
def test_synthetic_bad_params(key: str, value: object) -> None:
    with pytest.raises(ScenarioError) as err:
        DATASETS.get("synthetic")(None, False, 0, **{key: value})
    assert err.value.path == f"data.params.{key}"


# ----------------------------------------------------------------------------- fashion-mnist


@needs_fashion
def test_fashion_mnist_full_from_debian_path() -> None:
    ds = DATASETS.get("fashion_mnist")(None, False, 0)
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.train.x.dtype == torch.float32
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.train.y).tolist() == [6000] * 10
    assert abs(ds.train.x.mean().item()) < 0.01
    assert abs(ds.train.x.std().item() - 1.0) < 0.01


@needs_fashion
def test_fashion_mnist_limits_and_root_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_DIR.iterdir():
        (raw / f.name).symlink_to(f)
    load = DATASETS.get("fashion_mnist")
    a = load(str(tmp_path), False, 0, train_limit=500, test_limit=100)
    b = load(None, False, 0, train_limit=500, test_limit=100)
    assert len(a.train) == 500 and len(a.test) == 100
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    full_labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    assert full_labels.shape == (60000,) and full_labels.dtype == np.uint8
    with pytest.raises(ScenarioError) as err:
        load(None, False, 0, train_limit=0)
    assert err.value.path == "data.params.train_limit"


def test_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedkd.data.datasets as datasets

    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataUnavailableError) as err:
        DATASETS.get("fashion_mnist")(str(tmp_path), False, 0)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "download: true" in message
    assert "apt-get install dataset-fashion-mnist" in message


# ----------------------------------------------------------------------------- cifar


def test_cifar10_fixture_loads(tmp_path: Path) -> None:
    first = _write_cifar10(tmp_path)
    ds = DATASETS.get("cifar10")(str(tmp_path), False, 0)
    assert isinstance(ds, LoadedDataset) and ds.num_classes == 10
    assert ds.input_shape == (3, 32, 32)
    assert ds.train.x.shape == (20, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert ds.train.y[:8].tolist() == [0, 1, 2, 3, 1, 2, 3, 4]
    assert ds.test.y.tolist() == [5, 6, 7, 8]
    expected = (first[0].reshape(3, 32, 32)[0, 0, 0] / 255.0 - 0.4914) / 0.2470
    assert ds.train.x[0, 0, 0, 0].item() == pytest.approx(expected, abs=1e-5)
    limited = DATASETS.get("cifar10")(str(tmp_path), False, 0, train_limit=6, test_limit=2)
    assert len(limited.train) == 6 and len(limited.test) == 2


def test_cifar100_fixture_loads(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        data = np.zeros((n, 3072), dtype=np.uint8)
        with (folder / name).open("wb") as fh:
            pickle.dump({"data": data, "fine_labels": list(range(90, 90 + n)),
                         "coarse_labels": [0] * n}, fh)
    ds = DATASETS.get("cifar100")(str(tmp_path), False, 0)
    assert ds.num_classes == 100 and ds.train.x.shape == (6, 3, 32, 32)
    assert ds.test.y.tolist() == [90, 91, 92]
    assert ds.train.x[0, :, 0, 0].tolist() == pytest.approx(
        [-0.5071 / 0.2673, -0.4865 / 0.2564, -0.4409 / 0.2762], abs=1e-5
    )


def test_cifar10_missing_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError) as err:
        DATASETS.get("cifar10")(str(tmp_path), False, 0)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "download: true" in message


# ----------------------------------------------------------------------------- bundle


def _synthetic(seed: int = 0, n: int = 1000) -> LoadedDataset:
    return DATASETS.get("synthetic")(None, False, seed, train_size=n, test_size=50)


def _rows(split: TensorSplit) -> set[tuple[float, ...]]:
    return {tuple(row) for row in split.x.tolist()}


def test_bundle_disjoint_and_sized() -> None:
    ds = _synthetic()
    bundle = build_bundle(ds, seed=1, val_fraction=0.1, public_fraction=0.2, public_labeled=True)
    assert bundle.val is not None and bundle.public is not None
    assert (len(bundle.val), len(bundle.public), len(bundle.pool)) == (100, 200, 700)
    val, pub, pool = _rows(bundle.val), _rows(bundle.public), _rows(bundle.pool)
    assert not (val & pub) and not (val & pool) and not (pub & pool)
    assert val | pub | pool == _rows(ds.train)
    assert bundle.test is ds.test and bundle.public_labeled
    assert (bundle.num_classes, bundle.input_shape, bundle.name) == (10, (20,), "synthetic")


def test_bundle_reproducible() -> None:
    ds = _synthetic()
    a = build_bundle(ds, seed=4, val_fraction=0.1, public_fraction=0.1)
    b = build_bundle(ds, seed=4, val_fraction=0.1, public_fraction=0.1)
    c = build_bundle(ds, seed=5, val_fraction=0.1, public_fraction=0.1)
    assert a.val is not None and b.val is not None and c.val is not None
    assert torch.equal(a.pool.x, b.pool.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.val.x, c.val.x)


def test_bundle_without_held_out() -> None:
    ds = _synthetic()
    bundle = build_bundle(ds, seed=0)
    assert bundle.val is None and bundle.public is None
    assert torch.equal(bundle.pool.x, ds.train.x)


def test_bundle_external_public() -> None:
    ds, other = _synthetic(0), _synthetic(9, n=300)
    bundle = build_bundle(ds, seed=2, val_fraction=0.1, public_dataset=other, public_size=120)
    again = build_bundle(ds, seed=2, val_fraction=0.1, public_dataset=other, public_size=120)
    assert bundle.public is not None and again.public is not None
    assert len(bundle.public) == 120 and len(bundle.pool) == 900
    assert _rows(bundle.public) <= _rows(other.train)
    assert torch.equal(bundle.public.x, again.public.x)
    full = build_bundle(ds, seed=2, public_dataset=other)
    assert full.public is not None and len(full.public) == 300


def test_weight_split_disjoint_from_val_public_and_pool() -> None:
    ds = _synthetic()
    bundle = build_bundle(ds, seed=1, val_fraction=0.1, public_fraction=0.2,
                          weight_fraction=0.05)
    assert bundle.val is not None and bundle.public is not None and bundle.weight is not None
    assert (len(bundle.val), len(bundle.public), len(bundle.weight), len(bundle.pool)) == (
        100, 200, 50, 650)
    val, pub, weight, pool = (_rows(bundle.val), _rows(bundle.public), _rows(bundle.weight),
                              _rows(bundle.pool))
    assert not (weight & val) and not (weight & pub) and not (weight & pool)
    assert val | pub | weight | pool == _rows(ds.train)
    # the weighting split is cut after val and public: those two are as without it
    plain = build_bundle(ds, seed=1, val_fraction=0.1, public_fraction=0.2)
    assert plain.val is not None and plain.public is not None and plain.weight is None
    assert torch.equal(bundle.val.x, plain.val.x) and torch.equal(bundle.public.x, plain.public.x)
    assert _rows(bundle.pool) | weight == _rows(plain.pool)


def test_zero_weight_fraction_changes_nothing() -> None:
    ds = _synthetic()
    a = build_bundle(ds, seed=3, val_fraction=0.1, public_fraction=0.1)
    b = build_bundle(ds, seed=3, val_fraction=0.1, public_fraction=0.1, weight_fraction=0.0)
    assert b.weight is None and a.val is not None and b.val is not None
    assert torch.equal(a.pool.x, b.pool.x) and torch.equal(a.val.x, b.val.x)


def test_bundle_errors() -> None:
    ds = _synthetic()
    wrong = DATASETS.get("synthetic")(None, False, 0, num_features=5)
    with pytest.raises(ValueError, match="input shape"):
        build_bundle(ds, seed=0, public_dataset=wrong)
    with pytest.raises(ScenarioError) as err:
        build_bundle(ds, seed=0, val_fraction=1.5)
    assert err.value.path == "data.val_fraction"
    with pytest.raises(ScenarioError):
        build_bundle(ds, seed=0, val_fraction=0.6, public_fraction=0.5)
    with pytest.raises(ScenarioError) as err:
        build_bundle(ds, seed=0, public_fraction=0.1, public_dataset=_synthetic(1))
    assert err.value.path == "data.public_fraction"
    with pytest.raises(ScenarioError) as err:
        build_bundle(ds, seed=0, weight_fraction=-0.1)
    assert err.value.path == "data.weight_fraction"
    with pytest.raises(ScenarioError, match="val \\+ public \\+ weight"):
        build_bundle(ds, seed=0, val_fraction=0.5, public_fraction=0.3, weight_fraction=0.2)


# ----------------------------------------------------------------------------- downloads


def _offline_loader(calls: list[str], partial: bool = False) -> type:
    """A stand-in for a torchvision dataset class whose download fails as it does offline."""
    import socket
    import urllib.error

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(root)
            if partial:  # a half-written archive and half-extracted folder
                (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b partial")
                (Path(root) / "cifar-10-batches-py").mkdir()
                (Path(root) / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"trunc")
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    return Offline


@pytest.mark.parametrize("partial", [False, True])
def test_cifar_download_failure_is_one_line_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, partial: bool) -> None:
    import torchvision.datasets

    calls: list[str] = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _offline_loader(calls, partial))
    with pytest.raises(DataUnavailableError) as err:
        DATASETS.get("cifar10")(str(tmp_path), True, 0)
    message = str(err.value)
    assert message.startswith("cifar10: download failed (")
    assert "Name or service not known" in message and "\n" not in message
    assert f"looked in {tmp_path / 'cifar-10-batches-py'}" in message
    assert "put the extracted `cifar-10-batches-py` folder" in message
    assert len(calls) == 1 and Path(calls[0]).parent == tmp_path  # downloaded aside
    assert list(tmp_path.iterdir()) == []  # nothing half-finished is left to be read later


def test_cifar_download_moves_a_finished_folder_into_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class Online:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            _write_cifar10(Path(root))

    (tmp_path / "cifar-10-batches-py").mkdir()  # an earlier, incomplete copy
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"trunc")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Online)
    ds = DATASETS.get("cifar10")(str(tmp_path), True, 0)
    assert len(ds.train) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-batches-py"]


def test_client_data_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedkd.world as world_mod
    from fedkd.compose import load_scenario
    from fedkd.world import build_world

    monkeypatch.setattr(world_mod, "CLIENT_CACHE", 2)
    root = Path(__file__).resolve().parents[1]
    world = build_world(load_scenario(root / "scenarios" / "quickstart.yaml"))
    first = world.client_data(0)
    world.client_data(1)
    assert world.client_data(0) is first  # a hit, now the most recent
    world.client_data(2)  # evicts client 1, the least recently used
    assert list(world.__dict__["_client_data"]) == [0, 2]
    assert torch.equal(world.client_data(1).y, world.data.pool.subset(world.parts[1]).y)
