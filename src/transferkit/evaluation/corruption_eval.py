"""Accuracy under the common corruptions: every head on every dataset it can score, at each corruption and severity.

    result = score_corruptions(model, run, datasets, "test", options, device)
    cell = result.cells["mnist"]["mnist"]        # dataset -> head -> CorruptionCell
    cell.clean, cell.accuracy["fog"][3], cell.mca

Each dataset is scored on a seeded subset of its split (`--robust-images`), the clean images and every corrupted
copy being the same images, so a drop is the corruption's alone. The measures are Hendrycks & Dietterich's:
  mCA            mean corruption accuracy: the mean over every corruption and severity asked for
  CE             per corruption, sum over severities of this model's error / the reference model's
  relative CE    per corruption, sum over severities of (error - clean error), over the same for the reference:
                 how much of its accuracy the model loses to the corruption, next to what the reference loses
  mCE / rel. mCE their means over the corruptions where they exist (a ratio is None where the reference's
                 error, or its loss, is 0 or less: relative CE is large and noisy where the reference loses little)
The reference (`--reference RUN`, a source-only model say) is scored on the same images at its own input size,
with its head for each dataset: the one trained on it, else the one that can score most of its images.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transferkit.data import ImageDataset, load_dataset
from transferkit.data.base import limit_indices
from transferkit.errors import DataError
from transferkit.evaluation.corruptions import corrupt_batches
from transferkit.evaluation.matrix import head_targets
from transferkit.evaluation.robust_options import RobustnessOptions
from transferkit.preprocess import Preprocessing
from transferkit.runs import Run, load_run_model
from transferkit.training.evaluate import predict_logits


@dataclass
class CorruptionCell:
    """One head on one dataset: clean and corrupted accuracy on the same images."""

    images: int  # images whose class the head has
    own: bool  # the head was trained on the dataset
    clean: float
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # corruption -> severity -> accuracy

    @property
    def mca(self) -> float:
        return statistics.fmean(a for by_severity in self.accuracy.values() for a in by_severity.values())

    def mean(self, corruption: str) -> float:
        return statistics.fmean(self.accuracy[corruption].values())

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "own": self.own,
            "clean": self.clean,
            "mca": self.mca,
            "accuracy": {c: {str(s): a for s, a in by.items()} for c, by in self.accuracy.items()},
        }


@dataclass
class CorruptionResult:
    run: str
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    cells: dict[str, dict[str, CorruptionCell]]  # dataset -> head -> cell


def seeded_subset(ds: ImageDataset, split: str, options: RobustnessOptions) -> tuple[np.ndarray, np.ndarray]:
    part = ds.split(split)
    if part.streamed:
        raise DataError(f"{ds.name}: the {split} split streams from disk; score robustness on --split test or val")
    keep = limit_indices(len(part), options.robust_images, seed=options.robust_seed)
    return part.images[keep], part.labels[keep]


def _hits(model, pixels, run: Run, heads: list[str], device) -> dict[str, np.ndarray]:
    """uint8 images (numpy NHWC or a torch NCHW batch) -> head -> predicted class per image."""
    logits = predict_logits(model, pixels, run.preprocessing, device, heads=heads)
    return {h: v.argmax(1) for h, v in logits.items()}


def _accuracy(predicted: dict[str, np.ndarray], targets: dict[str, np.ndarray], head: str) -> float:
    """Accuracy of `head` over the images whose class it has (target -1: not in the head)."""
    keep = targets[head] >= 0
    return float((predicted[head][keep] == targets[head][keep]).mean())


def score_corruptions(
    model: torch.nn.Module,
    run: Run,
    datasets: list[ImageDataset],
    split: str,
    options: RobustnessOptions,
    device: str,
) -> CorruptionResult:
    from tqdm import tqdm

    cells: dict[str, dict[str, CorruptionCell]] = {}
    steps = len(datasets) * len(options.corruption_names) * len(options.severity_levels)
    progress = tqdm(total=steps, desc=f"corruptions {run.dir.name}", unit="set", disable=None, leave=False)
    for ds in datasets:
        pixels, labels = seeded_subset(ds, split, options)
        targets = head_targets(run, ds, labels)
        if not targets:
            progress.update(len(options.corruption_names) * len(options.severity_levels))
            continue
        heads = list(targets)
        clean = _hits(model, pixels, run, heads, device)
        row = {
            h: CorruptionCell(
                int((targets[h] >= 0).sum()), run.labels.datasets.get(ds.name) == h, _accuracy(clean, targets, h)
            )
            for h in heads
        }
        for name in options.corruption_names:
            for severity in options.severity_levels:
                parts = [
                    _hits(model, batch, run, heads, device)
                    for batch in corrupt_batches(pixels, name, severity, options.robust_seed, device)
                ]
                predicted = {h: np.concatenate([p[h] for p in parts]) for h in heads}
                for h in heads:
                    row[h].accuracy.setdefault(name, {})[severity] = _accuracy(predicted, targets, h)
                progress.update(1)
        cells[ds.name] = row
    progress.close()
    return CorruptionResult(str(run.dir), options.corruption_names, options.severity_levels, cells)


def score_reference(
    reference: str | Path,
    datasets: list[ImageDataset],
    loaded_at: Preprocessing,
    split: str,
    options: RobustnessOptions,
    device: str,
    limit: int | None,
) -> CorruptionResult:
    """The reference run on the same datasets (`datasets`, loaded at `loaded_at`), at its own input definition:
    reloaded when it differs (the same seeded images, resized for it)."""
    model, ref = load_run_model(reference)
    model.to(device, memory_format=torch.channels_last)
    if ref.preprocessing != loaded_at:
        datasets = [load_dataset(ds.spec or ds.name, ref.preprocessing, limit) for ds in datasets]
    return score_corruptions(model, ref, datasets, split, options, device)


def reference_cell(result: CorruptionResult, dataset: str) -> tuple[str, CorruptionCell] | None:
    """The reference's head for `dataset`: the one trained on it, else the one scoring the most of its images."""
    row = result.cells.get(dataset) or {}
    return max(row.items(), key=lambda hc: (hc[1].own, hc[1].images)) if row else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 1e-12 else None


def corruption_errors(cell: CorruptionCell, ref: CorruptionCell) -> dict:
    """CE and relative CE per corruption (None where the reference's error, or its loss, is 0), and their means
    over the corruptions where they exist."""
    ce, relative = {}, {}
    for name, by_severity in cell.accuracy.items():
        severities = [s for s in by_severity if s in ref.accuracy.get(name, {})]
        errors = sum(1 - by_severity[s] for s in severities)
        ref_errors = sum(1 - ref.accuracy[name][s] for s in severities)
        ce[name] = _ratio(errors, ref_errors)
        lost = sum(cell.clean - by_severity[s] for s in severities)
        ref_lost = sum(ref.clean - ref.accuracy[name][s] for s in severities)
        relative[name] = _ratio(lost, ref_lost)

    def mean(values: dict) -> float | None:
        present = [v for v in values.values() if v is not None]
        return statistics.fmean(present) if present else None

    return {"ce": ce, "mce": mean(ce), "relative_ce": relative, "relative_mce": mean(relative)}
