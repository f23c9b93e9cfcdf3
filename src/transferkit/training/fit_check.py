"""The end-of-training summary, and the warning a user needs when validation is far below training accuracy.

A run that fits its training batches (97%) and scores near chance on validation (63%) looks finished: the
loss fell, the best epoch was saved. The gap is the symptom of a few known causes, each with a number to look
at: too few optimiser steps for the network to move from ImageNet (and, before precise BatchNorm, for its
running statistics to follow), too few images per class to generalise from, or validation images unlike the
training ones (a domain gap). The warning names all three with this run's numbers.
"""

from __future__ import annotations

import numpy as np

from transferkit.training.batch_size import MIN_TOTAL_STEPS

GAP_POINTS = 10.0  # training accuracy this far above validation accuracy (percentage points) warns
FEW_IMAGES_PER_CLASS = 50


def fewest_per_class(setup) -> tuple[int, str, str]:
    """(images, class, dataset) of the training class with the fewest images, over every labelled dataset."""
    fewest = (np.iinfo(np.int64).max, "", "")
    for ds in setup.datasets:
        counts = np.bincount(ds.train.labels, minlength=len(ds.classes))
        k = int(counts.argmin())
        fewest = min(fewest, (int(counts[k]), ds.classes[k], ds.name))
    return fewest


def summary(record: dict, steps: int, batch: int) -> str:
    """One line on the best epoch: its validation and training accuracy, after how many steps."""
    vals = "  ".join(f"{k} {v:.4f}" for k, v in record["val_acc"].items())
    return (
        f"best epoch {record['epoch']}: val {vals}  train acc {record['train_acc']:.4f}; "
        f"{steps} optimiser steps of {batch} images"
    )


def gap_warning(record: dict, steps: int, batch: int, fewest: tuple[int, str, str]) -> str | None:
    """The warning for the best epoch's `record`, or None when validation is within GAP_POINTS of training."""
    train, val = 100 * record["train_acc"], 100 * record["val_acc_mean"]
    if train - val <= GAP_POINTS:
        return None
    images, cls, dataset = fewest
    causes = [
        f"too few optimiser steps: {steps} in all at batch {batch}"
        + (f" (under {MIN_TOTAL_STEPS}: a smaller --batch-size or more --epochs)" if steps < MIN_TOTAL_STEPS else ""),
        f"too few images per class: the fewest is {images} ({cls!r} in {dataset})"
        + (f" (under {FEW_IMAGES_PER_CLASS}: more images help most)" if images < FEW_IMAGES_PER_CLASS else ""),
        "a domain gap: validation images unlike the training ones (another camera, crop or source): "
        "look at a few of each",
    ]
    return (
        f"warning: validation accuracy {val:.1f}% is {train - val:.1f} points below training accuracy {train:.1f}% "
        f"(best epoch {record['epoch']}). Likely causes: " + "; ".join(causes) + "."
    )
