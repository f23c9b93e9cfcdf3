"""Dataset registry: name -> loader. `load_dataset("mnist", pre, limit=1000)` is the one entry point.

Names (see data/spec.py): the built-ins below, `imagefolder:PATH`, or anything added with `register_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from transferkit.data import builtin
from transferkit.data.base import DEFAULT_MAX_IN_MEMORY_BYTES, ImageDataset, Split, limit_indices
from transferkit.data.captured import check_capture, load_captured
from transferkit.data.imagefolder import load_imagefolder
from transferkit.data.spec import DatasetSpec
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
        "imagefolder:PATH": "your images: PATH/train/<class>/*, PATH/val/<class>/* (or PATH/<class>/*)",
        "traffic:DIR": "unlabeled only: the images a served model captured (serve --capture DIR)",
    }


def check_dataset_name(spec: str | DatasetSpec) -> DatasetSpec:
    """Refuse an unknown dataset before any work starts -> the parsed spec (a string is a plain dataset,
    no `=HEAD`)."""
    spec = DatasetSpec.parse(spec, with_head=False)
    if spec.traffic is not None:
        check_capture(spec.traffic)
        return spec
    if spec.path is None and spec.source not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise DataError(f"unknown dataset {spec.source!r}; use one of {known}, or imagefolder:PATH for your own images")
    return spec


def load_dataset(
    spec: str | DatasetSpec,
    pre: Preprocessing,
    limit: int | None = None,
    max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES,
) -> ImageDataset:
    """Load all three splits of the dataset `spec` names, resized to `pre.image_size`, at most `limit` images
    per split. An image folder whose train split would exceed `max_in_memory_bytes` keeps it on disk."""
    spec = check_dataset_name(spec)
    if spec.traffic is not None:  # unlabeled by nature: labels -1, no classes, every image in train
        splits, classes = load_captured(spec.traffic, pre, limit)
        return ImageDataset(name=spec.name, classes=classes, **splits, spec=spec.without_head())
    if spec.path is not None:
        splits, classes = load_imagefolder(spec.path, pre, limit, max_in_memory_bytes)
    else:
        native, classes = _REGISTRY[spec.source][0]()
        splits = {}
        for split, (images, labels) in native.items():
            keep = limit_indices(len(labels), limit)
            splits[split] = Split(pre.array_to_uint8(np.ascontiguousarray(images[keep])), labels[keep])
    for split, part in splits.items():
        if len(part) == 0:
            raise DataError(f"{spec.source}: the {split} split is empty")
        if part.labels.min() < 0 or part.labels.max() >= len(classes):
            raise DataError(f"{spec.source}: {split} labels fall outside the {len(classes)} class names")
    return ImageDataset(name=spec.name, classes=list(classes), **splits, spec=spec.without_head())
