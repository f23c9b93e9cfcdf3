"""Multi-dataset batch sampling: which images make each step's batch.

Datasets are concatenated into one pool; dataset i is drawn with probability p_i ∝ n_i^alpha
(alpha=1 proportional, alpha=0 balanced, in between: temperature sampling as in multilingual NMT).
An epoch has ceil(sum(n_i) / batch_size) steps whatever alpha is, so epochs stay comparable.

Every epoch's order is a pure function of (seed, epoch): a resumed run regenerates it and skips the steps
already done, and every process of a distributed run sees the same global batch and takes its own slice.
"""

from __future__ import annotations

import math

import numpy as np


def dataset_probabilities(sizes: list[int], alpha: float) -> np.ndarray:
    n = np.asarray(sizes, dtype=np.float64)
    if (n <= 0).any():
        raise ValueError(f"every dataset needs at least one training image, got sizes {sizes}")
    w = n**alpha
    return w / w.sum()


class MultiDatasetSampler:
    def __init__(self, sizes: list[int], batch_size: int, alpha: float = 1.0, seed: int = 0):
        self.sizes = list(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.batch_size = batch_size
        self.probs = dataset_probabilities(self.sizes, alpha)
        self.seed = seed
        self.steps_per_epoch = math.ceil(sum(self.sizes) / batch_size)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Global pool indices for every step of `epoch` (each array is one step's batch)."""
        rng = np.random.default_rng([self.seed, epoch])
        total = self.steps_per_epoch * self.batch_size
        proportional = np.allclose(self.probs, np.asarray(self.sizes) / sum(self.sizes))
        if proportional:  # exactly one pass over every image (the last batch is short), like a plain epoch
            counts = np.asarray(self.sizes)
        else:
            counts = rng.multinomial(total, self.probs)
        parts = []
        for i, (size, count) in enumerate(zip(self.sizes, counts)):
            reps = math.ceil(count / size)  # over-sampled datasets cycle through fresh permutations
            idx = np.concatenate([rng.permutation(size) for _ in range(reps)])[:count]
            parts.append(idx + self.offsets[i])
        order = np.concatenate(parts)
        rng.shuffle(order)
        return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]


class CyclingSampler:
    """Endless seeded permutations of one pool (the unlabeled images), `count` at a time per step."""

    def __init__(self, size: int, count: int, seed: int = 0):
        self.size, self.count, self.seed = size, count, seed

    def batch(self, epoch: int, step: int) -> np.ndarray:
        start = step * self.count
        first, last = start // self.size, (start + self.count - 1) // self.size
        perms = [np.random.default_rng([self.seed, epoch, 7, k]).permutation(self.size) for k in range(first, last + 1)]
        flat = np.concatenate(perms)
        begin = start - first * self.size
        return flat[begin : begin + self.count]


def shard(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's slice of a global batch (strided, so shards differ by at most one image)."""
    return batch[rank::world_size]
