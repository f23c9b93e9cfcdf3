"""What every dataset loader returns: uint8 images already at the model's input size, labels, class names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.data.spec import DatasetSpec

SPLITS = ("train", "val", "test")

# A training split larger than this (decoded, uint8) streams from disk instead of living in memory.
DEFAULT_MAX_IN_MEMORY_BYTES = 8 * 2**30

# Test and validation splits are drawn with this seed, independent of the training seed, so every run of a
# dataset is scored on the same held-out images.
SPLIT_SEED = 1234


def data_root() -> Path:
    """Where downloaded datasets are cached: $TRANSFERKIT_DATA, else ~/.cache/transferkit/data."""
    return Path(os.environ.get("TRANSFERKIT_DATA", Path.home() / ".cache" / "transferkit" / "data"))


@dataclass
class Split:
    """Decoded images in memory, or (for a training split too large for memory) the files to stream."""

    images: np.ndarray | None  # uint8 (N, S, S, 3); None when streamed from `paths`
    labels: np.ndarray  # int64 (N,)
    paths: list[Path] | None = None  # image files, decoded on the fly by a DataLoader when images is None

    def __post_init__(self) -> None:
        if self.images is None:
            if self.paths is None or len(self.paths) != len(self.labels):
                raise ValueError("a streamed split needs one path per label")
            return
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N,S,S,3), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    @property
    def streamed(self) -> bool:
        return self.images is None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageDataset:
    """A named dataset with train/val/test splits at one image size."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    spec: DatasetSpec | None = None  # where the images came from, as load_dataset was given it

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return getattr(self, name)


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
