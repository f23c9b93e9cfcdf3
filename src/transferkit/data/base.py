"""What every dataset loader returns: uint8 images already at the model's input size, labels, class names."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")

# Test and validation splits are drawn with this seed, independent of the training seed, so every run of a
# dataset is scored on the same held-out images.
SPLIT_SEED = 1234


def data_root() -> Path:
    """Where downloaded datasets are cached: $TRANSFERKIT_DATA, else ~/.cache/transferkit/data."""
    return Path(os.environ.get("TRANSFERKIT_DATA", Path.home() / ".cache" / "transferkit" / "data"))


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N,S,S,3), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class ImageDataset:
    """A named dataset with train/val/test splits at one image size."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return getattr(self, name)

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[1])

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.classes)} classes, "
            f"{len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test images"
        )


def seeded_split(n: int, fractions: tuple[float, float], seed: int = SPLIT_SEED) -> tuple[np.ndarray, ...]:
    """Indices for (train, val, test) with the given (val, test) fractions, the same on every machine."""
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = (max(1, int(round(n * f))) for f in fractions)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def limit_indices(n: int, limit: int | None, seed: int = SPLIT_SEED) -> np.ndarray:
    """A seeded random subset of `limit` indices (sorted), or all of them."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
