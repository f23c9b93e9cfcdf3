"""The gate's robustness check: every artifact beside PyTorch fp32 on a small, fixed sample of corrupted images.

verify.py compares an artifact with PyTorch on clean test images. Corrupted inputs push activations where clean
ones never go (an INT8 calibration's clipping ranges, a compiler's fused approximations show there first), so
the gate also runs every artifact on

    gaussian noise, gaussian blur and JPEG (transferkit.evaluation.corruptions) x severities 2 and 4
    x up to IMAGES_PER_DATASET of the gate's test images per dataset (seeded: the same sample on every export)

and records per head, overall and per corruption: PyTorch's accuracy, the artifact's, the delta in points and
their top-1 agreement (verify.json, "robustness"; the export table's `corr.` columns). With `--robust-tolerance
POINTS` an artifact whose accuracy on the sample falls more than POINTS below PyTorch's fails the gate; without
it the numbers are recorded and nothing more. The sample is small on purpose (384 images for two datasets):
export gets slower by one PyTorch pass over it and one artifact pass each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.export.verify import VerifyInputs, pytorch_logits, runtime_logits

if TYPE_CHECKING:
    import torch

    from transferkit.preprocess import Preprocessing
    from transferkit.runtimes.runtime import Runtime

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg_compression")
SEVERITIES = (2, 4)
IMAGES_PER_DATASET = 32
SEED = 0


@dataclass
class CorruptedSample:
    """The corrupted copies of some gate images, normalised, with PyTorch fp32's logits on them."""

    batch: np.ndarray  # float32 (N,3,S,S): every block of corrupted images, one after the other
    rows: dict[str, np.ndarray]  # head -> row indices into batch
    labels: dict[str, np.ndarray]  # head -> labels of those rows
    blocks: list[str]  # "corruption/severity" of each block, in batch order
    block_of: np.ndarray  # per row of batch: index into blocks
    images: dict[str, int]  # dataset -> clean images in the sample
    reference: dict[str, np.ndarray]  # head -> PyTorch fp32 logits on batch

    def describe(self) -> dict[str, Any]:
        """For verify.json: what the sample is."""
        return {
            "corruptions": list(CORRUPTIONS),
            "severities": list(SEVERITIES),
            "images_per_dataset": self.images,
            "seed": SEED,
            "reference": "PyTorch fp32 on the same corrupted images",
        }

    def compare(self, logits: dict[str, np.ndarray], tolerance_points: float | None) -> dict[str, Any]:
        """Per head (and per corruption block): accuracies, delta in points, top-1 agreement; a failure per head
        whose delta is below -tolerance_points (None: recorded only)."""
        heads, failures = {}, []
        for head, rows in self.rows.items():
            ref, got, y = self.reference[head][rows].argmax(1), logits[head][rows].argmax(1), self.labels[head]
            stats = _stats(ref, got, y)
            stats["per_corruption"] = {
                block: _stats(ref[mask], got[mask], y[mask])
                for b, block in enumerate(self.blocks)
                if (mask := self.block_of[rows] == b).any()
            }
            heads[head] = stats
            if tolerance_points is not None and stats["accuracy_delta_points"] < -tolerance_points:
                failures.append(
                    f"{head}: accuracy on corrupted images {stats['accuracy_delta_points']:+.2f} points against "
                    f"PyTorch's, beyond --robust-tolerance {tolerance_points:g}"
                )
        return {"passed": not failures, "tolerance_points": tolerance_points, "heads": heads, "failures": failures}

    def check(self, report: dict[str, Any], runtime: Runtime, tolerance_points: float | None) -> None:
        """Run the artifact on the sample; record the comparison in its verify report and fail it if asked."""
        result = self.compare(runtime_logits(runtime, self.batch), tolerance_points)
        report["robustness"] = result
        if result["failures"]:
            report["failures"] = report.get("failures", []) + result["failures"]
            report["passed"] = False


def _stats(ref: np.ndarray, got: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    acc_ref, acc_got = float((ref == y).mean()), float((got == y).mean())
    return {
        "images": int(len(y)),
        "accuracy_pytorch": acc_ref,
        "accuracy_format": acc_got,
        "accuracy_delta_points": 100.0 * (acc_got - acc_ref),
        "top1_agreement": float((ref == got).mean()),
    }


def _picked(inputs: VerifyInputs) -> tuple[np.ndarray, dict[str, int]]:
    """Rows of inputs to corrupt: a seeded choice of up to IMAGES_PER_DATASET per dataset, and how many each."""
    rng = np.random.default_rng(SEED)
    picked, images = [], {}
    for head, head_rows in inputs.rows.items():
        start = 0
        for dataset, n in inputs.datasets[head].items():  # a head's rows are its datasets', in this order
            rows = head_rows[start : start + n]
            start += n
            chosen = np.sort(rng.choice(rows, size=min(n, IMAGES_PER_DATASET), replace=False))
            picked.append(chosen)
            images[dataset] = len(chosen)
    return np.concatenate(picked), images


def corrupted_sample(
    inputs: VerifyInputs, pre: Preprocessing, module: torch.nn.Module, heads: list[str]
) -> CorruptedSample | None:
    """The sample from the gate's test images (None when inputs carry no pixels), with PyTorch's logits on it."""
    import torch

    from transferkit.evaluation.corruptions import corrupt

    if inputs.pixels is None:
        return None
    picked, images = _picked(inputs)
    clean = torch.from_numpy(np.ascontiguousarray(inputs.pixels[picked])).permute(0, 3, 1, 2).contiguous()
    blocks, parts = [], []
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            corrupted = corrupt(clean, name, severity, seed=SEED).permute(0, 2, 3, 1).numpy()
            parts.append(pre.normalize_numpy(np.ascontiguousarray(corrupted)))
            blocks.append(f"{name}/{severity}")
    position = {int(r): i for i, r in enumerate(picked)}
    n = len(picked)
    rows, labels = {}, {}
    for head, head_rows in inputs.rows.items():
        mine = [(position[int(r)], label) for r, label in zip(head_rows, inputs.labels[head]) if int(r) in position]
        at = np.array([p for p, _ in mine], dtype=np.int64)
        rows[head] = np.concatenate([b * n + at for b in range(len(blocks))])
        labels[head] = np.tile(np.array([label for _, label in mine], dtype=np.int64), len(blocks))
    batch = np.concatenate(parts)
    block_of = np.repeat(np.arange(len(blocks)), n)
    return CorruptedSample(batch, rows, labels, blocks, block_of, images, pytorch_logits(module, batch, heads))
