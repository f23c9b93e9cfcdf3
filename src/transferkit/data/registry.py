"""Dataset registry: name -> loader. `load_dataset("mnist", pre, limit=1000)` is the one entry point.

Names: the built-ins below, `imagefolder:PATH`, or anything added with `register_dataset`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from transferkit.data import builtin
from transferkit.data.base import DEFAULT_MAX_IN_MEMORY_BYTES, ImageDataset, Split, limit_indices
from transferkit.data.imagefolder import load_imagefolder
from transferkit.errors import DataError
from transferkit.preprocess import Preprocessing

NativeLoader = Callable[[], "tuple[builtin.NativeSplits, list[str]]"]

_REGISTRY: dict[str, tuple[NativeLoader, str]] = {}


def register_dataset(name: str, loader: NativeLoader, description: str) -> None:
    """Add a dataset whose loader returns native uint8 pixels per split and the class names."""
    _REGISTRY[name] = (loader, description)


register_dataset("digits", builtin.load_digits, "UCI optical digits (scikit-learn), 8x8, 10 classes, offline")
register_dataset("mnist", builtin.load_mnist, "MNIST handwritten digits, 28x28, 10 classes")
register_dataset("fashion-mnist", builtin.load_fashion_mnist, "Fashion-MNIST clothing, 28x28, 10 classes")
register_dataset("cifar10", lambda: builtin.load_cifar("cifar10"), "CIFAR-10 (torchvision download), 32x32")
register_dataset("cifar100", lambda: builtin.load_cifar("cifar100"), "CIFAR-100 (torchvision download), 32x32")


def available_datasets() -> dict[str, str]:
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())} | {
        "imagefolder:PATH": "your images: PATH/train/<class>/*, PATH/val/<class>/* (or PATH/<class>/*)"
    }


def check_dataset_name(name: str) -> None:
    """Refuse an unknown dataset name before any work starts."""
    if name.startswith("imagefolder:"):
        if not name[len("imagefolder:") :]:
            raise DataError("imagefolder: needs a path, e.g. imagefolder:./my_images")
        return
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise DataError(f"unknown dataset {name!r}; use one of {known}, or imagefolder:PATH for your own images")


def load_dataset(
    name: str, pre: Preprocessing, limit: int | None = None, max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES
) -> ImageDataset:
    """Load all three splits of `name`, resized to `pre.image_size`, at most `limit` images per split.
    An image folder whose train split would exceed `max_in_memory_bytes` keeps it on disk (streamed)."""
    check_dataset_name(name)
    if name.startswith("imagefolder:"):
        splits, classes = load_imagefolder(name[len("imagefolder:") :], pre, limit, max_in_memory_bytes)
    else:
        native, classes = _REGISTRY[name][0]()
        splits = {}
        for split, (images, labels) in native.items():
            keep = limit_indices(len(labels), limit)
            splits[split] = Split(pre.array_to_uint8(np.ascontiguousarray(images[keep])), labels[keep])
    for split, part in splits.items():
        if len(part) == 0:
            raise DataError(f"{name}: the {split} split is empty")
        if part.labels.min() < 0 or part.labels.max() >= len(classes):
            raise DataError(f"{name}: {split} labels fall outside the {len(classes)} class names")
    return ImageDataset(name=_short_name(name), classes=list(classes), **splits)


def _short_name(name: str) -> str:
    """`imagefolder:/data/flowers/` -> `flowers`: a head and a manifest key, not a path."""
    if name.startswith("imagefolder:"):
        from pathlib import Path

        return Path(name[len("imagefolder:") :]).expanduser().resolve().name or "images"
    return name
