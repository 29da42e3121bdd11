"""Dataset loaders: each reads a dataset once into normalized in-memory tensors.

Every loader has the signature ``load(root, download, seed, **params) -> LoadedDataset`` and is
registered in :data:`DATASETS` under its YAML name.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from fedkd.data.base import LoadedDataset, TensorSplit
from fedkd.errors import DataUnavailableError, ScenarioError
from fedkd.registry import Registry

DATASETS: Registry[Callable[..., LoadedDataset]] = Registry("dataset")

DEFAULT_ROOT = "./data"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------- parameter checks


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as int, or raise a ScenarioError naming ``data.params.<name>``."""
    if not _is_int(value) or int(value) < minimum:
        raise ScenarioError(f"data.params.{name}", value, f"an integer >= {minimum}")
    return int(value)


def _check_limit(name: str, value: object) -> int | None:
    """Validate an optional sample limit (``None`` or an integer >= 1)."""
    if value is None:
        return None
    if not _is_int(value) or int(value) < 1:
        raise ScenarioError(f"data.params.{name}", value, "null or an integer >= 1")
    return int(value)


# ----------------------------------------------------------------------------- array helpers


def _limit_indices(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted positions of a seeded random subset of size ``limit``, or None to keep all."""
    if limit is None or limit >= n:
        return None
    return np.sort(rng.choice(n, size=limit, replace=False))


def _apply_limit(
    x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Keep a seeded random subset of at most ``limit`` samples."""
    idx = _limit_indices(len(y), limit, rng)
    if idx is None:
        return x, y
    return x[idx], y[idx]


def _normalize_uint8(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Scale uint8 NCHW images to [0, 1] and normalize each channel in place."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    channels = x.shape[1]
    mean_t = torch.tensor(mean, dtype=torch.float32).reshape(1, channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).reshape(1, channels, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def _image_split(
    x: np.ndarray, y: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> TensorSplit:
    return TensorSplit(_normalize_uint8(x, mean, std), _labels(y))


# ----------------------------------------------------------------------------- digits


@DATASETS.register("digits")
def load_digits(
    root: str | None, download: bool, seed: int, test_fraction: float = 0.2
) -> LoadedDataset:
    """Scikit-learn's 8x8 handwritten digits (bundled with scikit-learn, always offline).

    Parameters
    ----------
    root, download : ignored
        Present for the common loader signature.
    seed : int
        Seed of the stratified train/test split.
    test_fraction : float
        Fraction of the 1797 samples put in the test split, in (0, 1).

    Returns
    -------
    LoadedDataset
        Images of shape ``(1, 8, 8)`` normalized by the train mean and std.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not _is_number(test_fraction) or not 0.0 < float(test_fraction) < 1.0:
        raise ScenarioError("data.params.test_fraction", test_fraction, "a number in (0, 1)")
    bunch = sk_load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            images, labels, test_size=float(test_fraction), random_state=seed, stratify=labels
        )
    except ValueError as exc:
        raise ScenarioError(
            "data.params.test_fraction",
            test_fraction,
            "a fraction leaving every class in both splits",
        ) from exc
    mean, std = float(x_tr.mean()), float(x_tr.std())
    train = TensorSplit(_tabular_images(x_tr, mean, std), _labels(y_tr))
    test = TensorSplit(_tabular_images(x_te, mean, std), _labels(y_te))
    return LoadedDataset("digits", train, test, 10, (1, 8, 8))


def _tabular_images(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """(N, H, W) float array -> normalized (N, 1, H, W) float32 tensor."""
    return torch.from_numpy(((x - mean) / std).astype(np.float32)[:, None, :, :].copy())


# ----------------------------------------------------------------------------- fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Parameters
    ----------
    path : Path
        File path; a ``.gz`` suffix means gzip compression.

    Returns
    -------
    numpy.ndarray
        The array with the shape given in the IDX header.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    return array.reshape(dims).copy()


def _find_idx(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem.gz`` or ``directory/stem`` if either exists."""
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_dirs(root: str | None) -> list[Path]:
    """Directories searched for the Fashion-MNIST IDX files, in order."""
    dirs: list[Path] = []
    if root is not None:
        base = Path(root).expanduser().resolve()
        dirs += [base, base / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_FASHION_MNIST)
    if root is None:
        base = Path(DEFAULT_ROOT).resolve()
        dirs += [base, base / "FashionMNIST" / "raw"]
    return dirs


def _complete_idx_set(directory: Path) -> dict[str, Path] | None:
    """Paths of all four Fashion-MNIST files in ``directory``, or None if any is missing."""
    found = {key: _find_idx(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
    if any(path is None for path in found.values()):
        return None
    return {key: path for key, path in found.items() if path is not None}


def download_into(name: str, base: Path, folder: str, fetch: Callable[[Path], None],
                  by_hand: str) -> Path:
    """Download a dataset with ``fetch`` and move its ``folder`` into ``base`` when complete.

    ``fetch(tmp)`` downloads and extracts into a fresh temporary folder inside ``base``; only
    a finished download is moved into place (an interrupted or failed one is deleted, never
    read later).

    Raises
    ------
    DataUnavailableError
        One line: that the download failed and why, where fedkd looked, and ``by_hand``.
    """
    target = base / folder
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-download-", dir=base))
    except OSError as exc:
        raise DataUnavailableError(f"{name}: cannot create {base} for the download "
                                   f"({exc.strerror or exc}); {by_hand}") from None
    try:
        fetch(tmp)
        if not (tmp / folder).is_dir():
            raise OSError(f"the download has no `{folder}` folder")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / folder, target)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(getattr(exc, "reason", None) or exc).split()) or type(exc).__name__
        raise DataUnavailableError(f"{name}: download failed ({reason}); looked in {target}; "
                                   f"{by_hand}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _locate_fashion_mnist(root: str | None, download: bool) -> dict[str, Path]:
    """Find the Fashion-MNIST files, downloading them with torchvision only if allowed."""
    dirs = _fashion_dirs(root)
    for directory in dirs:
        files = _complete_idx_set(directory)
        if files is not None:
            return files
    looked = ", ".join(str(d) for d in dirs)
    if download:
        from torchvision.datasets import FashionMNIST

        target = Path(root or DEFAULT_ROOT).expanduser().resolve()
        download_into("fashion_mnist", target, "FashionMNIST",
                      lambda tmp: FashionMNIST(str(tmp), train=True, download=True),
                      f"also looked in {looked}; install them with "
                      "`apt-get install dataset-fashion-mnist` or put the four IDX files there")
        files = _complete_idx_set(target / "FashionMNIST" / "raw")
        if files is not None:
            return files
    raise DataUnavailableError(
        f"fashion_mnist: IDX files not found (looked in {looked}); install them with "
        "`apt-get install dataset-fashion-mnist` or set `data.download: true`"
    )


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(
    root: str | None,
    download: bool,
    seed: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> LoadedDataset:
    """Fashion-MNIST read from its four IDX files.

    Parameters
    ----------
    root : str or None
        Directory holding the files (directly or in ``FashionMNIST/raw``); the Debian
        package path ``/usr/share/datasets/fashion-mnist`` is searched next.
    download : bool
        Download with torchvision into ``root`` (default ``./data``) when nothing is found.
    seed : int
        Seed of the random subsets chosen by the limits.
    train_limit, test_limit : int or None
        Keep a seeded random subset of this many samples.

    Returns
    -------
    LoadedDataset
        Images ``(1, 28, 28)`` normalized with mean 0.2860 and std 0.3530.

    Raises
    ------
    DataUnavailableError
        When the files are absent and ``download`` is false.
    """
    train_limit = _check_limit("train_limit", train_limit)
    test_limit = _check_limit("test_limit", test_limit)
    files = _locate_fashion_mnist(root, download)
    rng = np.random.default_rng(seed)
    splits = []
    for prefix, limit in (("train", train_limit), ("test", test_limit)):
        x = read_idx(files[f"{prefix}_x"])
        y = read_idx(files[f"{prefix}_y"])
        x, y = _apply_limit(x, y, limit, rng)
        mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
        splits.append(_image_split(x[:, None, :, :], y, mean, std))
    return LoadedDataset("fashion_mnist", splits[0], splits[1], 10, (1, 28, 28))


# ----------------------------------------------------------------------------- cifar


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR batch into uint8 NCHW images and labels."""
    with path.open("rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    return data, labels


def _read_cifar_files(paths: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_cifar_batch(path, label_key) for path in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _ensure_cifar(
    name: str, root: str | None, download: bool, folder: str, files: list[str]
) -> Path:
    """Return the CIFAR folder, downloading it with torchvision only when allowed."""
    base = Path(root or DEFAULT_ROOT).expanduser().resolve()
    directory = base / folder
    if all((directory / f).is_file() for f in files):
        return directory
    if download:
        from torchvision import datasets

        loader = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        download_into(name, base, folder,
                      lambda tmp: loader(str(tmp), train=True, download=True),
                      f"to work offline, put the extracted `{folder}` folder (from the "
                      f"dataset's python tarball) in {base} and set `data.download: false`")
        if all((directory / f).is_file() for f in files):
            return directory
    raise DataUnavailableError(
        f"{name}: not found at {directory}; set `data.download: true` or place the extracted "
        f"`{folder}` folder in {base}"
    )


def _load_cifar(
    name: str,
    root: str | None,
    download: bool,
    seed: int,
    train_limit: int | None,
    test_limit: int | None,
) -> LoadedDataset:
    """Shared CIFAR-10/100 loader."""
    train_limit = _check_limit("train_limit", train_limit)
    test_limit = _check_limit("test_limit", test_limit)
    if name == "cifar10":
        folder, label_key, num_classes = "cifar-10-batches-py", "labels", 10
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, mean, std = ["test_batch"], CIFAR10_MEAN, CIFAR10_STD
    else:
        folder, label_key, num_classes = "cifar-100-python", "fine_labels", 100
        train_files, test_files, mean, std = ["train"], ["test"], CIFAR100_MEAN, CIFAR100_STD
    directory = _ensure_cifar(name, root, download, folder, train_files + test_files)
    rng = np.random.default_rng(seed)
    splits = []
    for names, limit in ((train_files, train_limit), (test_files, test_limit)):
        x, y = _read_cifar_files([directory / f for f in names], label_key)
        x, y = _apply_limit(x, y, limit, rng)
        splits.append(_image_split(x, y, mean, std))
    return LoadedDataset(name, splits[0], splits[1], num_classes, (3, 32, 32))


@DATASETS.register("cifar10")
def load_cifar10(
    root: str | None,
    download: bool,
    seed: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> LoadedDataset:
    """CIFAR-10 from torchvision's on-disk format (``root/cifar-10-batches-py``).

    Parameters
    ----------
    root : str or None
        Directory containing ``cifar-10-batches-py``; ``./data`` when None.
    download : bool
        Download with torchvision when the files are absent.
    seed : int
        Seed of the random subsets chosen by the limits.
    train_limit, test_limit : int or None
        Keep a seeded random subset of this many samples.

    Returns
    -------
    LoadedDataset
        Images ``(3, 32, 32)`` normalized per channel.

    Raises
    ------
    DataUnavailableError
        When the files are absent and ``download`` is false.
    """
    return _load_cifar("cifar10", root, download, seed, train_limit, test_limit)


@DATASETS.register("cifar100")
def load_cifar100(
    root: str | None,
    download: bool,
    seed: int,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> LoadedDataset:
    """CIFAR-100 (fine labels) from torchvision's on-disk format (``root/cifar-100-python``).

    Parameters
    ----------
    root : str or None
        Directory containing ``cifar-100-python``; ``./data`` when None.
    download : bool
        Download with torchvision when the files are absent.
    seed : int
        Seed of the random subsets chosen by the limits.
    train_limit, test_limit : int or None
        Keep a seeded random subset of this many samples.

    Returns
    -------
    LoadedDataset
        Images ``(3, 32, 32)`` normalized per channel, 100 classes.

    Raises
    ------
    DataUnavailableError
        When the files are absent and ``download`` is false.
    """
    return _load_cifar("cifar100", root, download, seed, train_limit, test_limit)


# ----------------------------------------------------------------------------- synthetic


def _check_synthetic(
    num_classes: int, num_features: int, train_size: int, test_size: int, separation: float
) -> None:
    """Validate the synthetic dataset parameters."""
    _check_int("num_classes", num_classes, 2)
    _check_int("num_features", num_features, 1)
    _check_int("train_size", train_size, num_classes)
    _check_int("test_size", test_size, 1)
    if not _is_number(separation) or not 0.0 <= float(separation) < float("inf"):
        raise ScenarioError("data.params.separation", separation, "a finite number >= 0")


def _gaussian_split(
    centers: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``size`` balanced samples around ``centers`` with unit-variance noise."""
    num_classes, num_features = centers.shape
    y = rng.permutation(np.arange(size) % num_classes)
    x = centers[y] + rng.standard_normal((size, num_features))
    return x, y


@DATASETS.register("synthetic")
def load_synthetic(
    root: str | None,
    download: bool,
    seed: int,
    num_classes: int = 10,
    num_features: int = 20,
    train_size: int = 2000,
    test_size: int = 500,
    separation: float = 2.0,
) -> LoadedDataset:
    """Seeded Gaussian class clusters, a fast tabular dataset that needs no files.

    Parameters
    ----------
    root, download : ignored
        Present for the common loader signature.
    seed : int
        Seed of the centers and samples.
    num_classes, num_features : int
        Number of clusters and of features.
    train_size, test_size : int
        Number of samples per split (classes balanced up to one sample).
    separation : float
        Norm of every class center; the noise is standard normal.

    Returns
    -------
    LoadedDataset
        Tabular inputs ``(num_features,)`` standardized per feature with train statistics.
    """
    _check_synthetic(num_classes, num_features, train_size, test_size, separation)
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((num_classes, num_features))
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    centers = float(separation) * directions / np.maximum(norms, 1e-12)
    x_tr, y_tr = _gaussian_split(centers, int(train_size), rng)
    x_te, y_te = _gaussian_split(centers, int(test_size), rng)
    mean, std = x_tr.mean(axis=0), np.maximum(x_tr.std(axis=0), 1e-12)
    train = TensorSplit(torch.from_numpy(((x_tr - mean) / std).astype(np.float32)), _labels(y_tr))
    test = TensorSplit(torch.from_numpy(((x_te - mean) / std).astype(np.float32)), _labels(y_te))
    return LoadedDataset("synthetic", train, test, int(num_classes), (int(num_features),))
