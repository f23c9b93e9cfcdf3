"""Kernel MMD on the backbone's features (`transferkit drift --mmd`): the representation-level shift test.

Rabanser et al. ("Failing Loudly", NeurIPS 2019) rank a two-sample test on a model's representation next to
the black-box tests on its softmax outputs (shift.py): it sees a change in what the images look like to the
backbone even where the heads' answers have not moved yet. The test here:
- features: the run's PyTorch backbone (pooled, before the heads) on the captured pixels and on the run's
  held-out test images, at most MAX_ROWS of each (a seeded sample), L2-normalised;
- statistic: the unbiased estimate of MMD^2 with a Gaussian kernel, its bandwidth the median distance between
  all the points (the median heuristic of Gretton et al., JMLR 2012);
- p-value: a permutation test (PERMUTATIONS relabellings of the pooled sample, from the one kernel matrix),
  p = (1 + #{permuted >= observed}) / (1 + PERMUTATIONS).
The served artifacts output logits only, so the features come from the run's model.pt, not from what served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from transferkit.preprocess import Preprocessing
from transferkit.training.precision import forward

MAX_ROWS = 500  # per side: the kernel matrix is (2 x MAX_ROWS)^2
PERMUTATIONS = 500
SEED = 0


@dataclass(frozen=True)
class MmdTest:
    rows: int  # traffic rows tested (after sampling)
    reference_rows: int
    mmd2: float
    p: float


@torch.no_grad()
def backbone_features(
    model: torch.nn.Module, images: np.ndarray, pre: Preprocessing, device="cpu", batch_size: int = 256
) -> np.ndarray:
    """uint8 (N, S, S, 3) images -> the backbone's features (N, D) float32, L2-normalised."""
    model.eval()
    parts = []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2)
        parts.append(forward(model.backbone, pre, x).float().cpu().numpy())
    feats = np.concatenate(parts) if parts else np.empty((0, model.feature_dim), np.float32)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def sample_rows(n: int, limit: int = MAX_ROWS, seed: int = SEED) -> np.ndarray:
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _mmd2(kernel: np.ndarray, splits: np.ndarray, n: int) -> np.ndarray:
    """Unbiased MMD^2 for each column of `splits` ((N, K) 0/1: 1 marks the first sample, of n rows), from the
    pooled kernel matrix, all columns in one matrix product."""
    m = len(kernel) - n
    diagonal, row_sums = np.diag(kernel), kernel.sum(1)
    k_a = kernel @ splits  # (N, K)
    other = 1.0 - splits
    within_x = (splits * k_a).sum(0) - diagonal @ splits
    between = (other * k_a).sum(0)
    within_y = (other * (row_sums[:, None] - k_a)).sum(0) - diagonal @ other
    return within_x / (n * (n - 1)) + within_y / (m * (m - 1)) - 2 * between / (n * m)


def mmd_test(reference: np.ndarray, traffic: np.ndarray, permutations: int = PERMUTATIONS, seed: int = SEED) -> MmdTest:
    """Two samples of feature vectors (N, D) and (M, D), each of at least 2 rows -> MMD^2 and its p-value."""
    if len(reference) < 2 or len(traffic) < 2:
        raise ValueError("the MMD test needs at least 2 rows on each side")
    pooled = np.concatenate([reference, traffic]).astype(np.float64)
    norms = (pooled**2).sum(1)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2 * pooled @ pooled.T, 0.0)
    upper = squared[np.triu_indices(len(pooled), 1)]
    bandwidth = float(np.median(upper[upper > 0])) if (upper > 0).any() else 1.0  # median squared distance
    kernel = np.exp(-squared / bandwidth)
    n = len(reference)
    first = np.zeros(len(pooled))
    first[:n] = 1.0
    rng = np.random.default_rng(seed)
    splits = np.stack([first] + [rng.permutation(first) for _ in range(permutations)], axis=1)
    stats = _mmd2(kernel, splits, n)
    observed = float(stats[0])
    larger = int((stats[1:] >= observed).sum())
    return MmdTest(len(traffic), n, observed, (1 + larger) / (1 + permutations))


def held_out_images(run, images: int) -> list[np.ndarray]:
    """Up to `images` test images of each dataset the run was trained on, at its input size (labels.json's specs)."""
    from transferkit.data import DatasetSpec, load_dataset

    return [
        load_dataset(
            DatasetSpec.parse(run.labels.specs.get(d) or d, with_head=False), run.preprocessing, images
        ).test.images
        for d in run.labels.datasets
    ]


class FeatureShift:
    """The run's PyTorch backbone and its features of the run's held-out test images (up to `images` a dataset,
    MAX_ROWS in all), ready to test windows of captured rows against them."""

    def __init__(self, run_dir, images: int):
        from transferkit.runs import load_run_model

        self.model, run = load_run_model(run_dir)
        self.pre = run.preprocessing
        pixels = np.concatenate(held_out_images(run, images))
        self.reference = backbone_features(self.model, pixels[sample_rows(len(pixels))], self.pre)

    def test(self, table) -> MmdTest | None:
        """A window of captured rows (a pyarrow table in traffic.py's layout) -> the test on its images, or None
        when it holds fewer than 2 images (rows of tensor requests have none)."""
        from transferkit.traffic import image_rows, images_of

        with_pixels = image_rows(table)
        if len(with_pixels) < 2:
            return None
        images = images_of(table, with_pixels[sample_rows(len(with_pixels))], self.pre)
        return mmd_test(self.reference, backbone_features(self.model, images, self.pre))


__all__ = ["MAX_ROWS", "FeatureShift", "held_out_images", "MmdTest", "backbone_features", "mmd_test", "sample_rows"]
