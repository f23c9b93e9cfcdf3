"""`traffic:DIR` datasets: the images a served model saw (`serve --capture DIR`), as unlabeled training data.

Captured rows hold the model's input (uint8 RGB at the served size), never a true label, so a traffic dataset is
only ever `--unlabeled`: its labels are -1 (unknown), it has no classes of its own, and its images all sit in the
train split (validation and test are empty: there is nothing to score). Rows that carry no pixels (requests
that sent model input tensors) are skipped. Images captured at another size than the training size are resized
like any other dataset's.

Which head pseudo-labels the images: `traffic:DIR=HEAD`, or, when the capture answered with one head only, that
head (`captured_heads`). A capture of several models must be narrowed to one: point at DIR/<model>.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.data.base import Split, limit_indices
from transferkit.errors import DataError
from transferkit.preprocess import Preprocessing
from transferkit.traffic import image_rows, images_of, parts, read_capture

LOGITS_SUFFIX = "_logits"


def check_capture(path: str | Path) -> list[Path]:
    """The committed parts under `path`, or a DataError naming the problem and the fix."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"traffic:{path}: no such folder; serve with --capture {path} first, or fix the path")
    found = parts(folder)
    if not found:
        raise DataError(
            f"traffic:{path}: no captured parts (part-*.parquet) in it; serve with --capture {path} and send traffic"
        )
    return found


def _one_model(table, path: str | Path):
    models = sorted(set(table.column("model").to_pylist()))
    if len(models) > 1:
        raise DataError(
            f"traffic:{path} holds the traffic of {len(models)} models {models}; train on one: traffic:{path}/<model>"
        )
    return table


def captured_heads(path: str | Path) -> list[str]:
    """The heads whose answers the capture under `path` holds (from its first part's columns)."""
    import pyarrow.parquet as pq

    names = pq.read_schema(check_capture(path)[0]).names
    return [n[: -len(LOGITS_SUFFIX)] for n in names if n.endswith(LOGITS_SUFFIX)]


def read_one_model(path: str | Path):
    """Every committed part under `path` as one table, refused unless it is one model's traffic."""
    check_capture(path)
    return _one_model(read_capture(Path(path).expanduser()), path)


def load_captured(path: str | Path, pre: Preprocessing, limit: int | None = None) -> tuple[dict[str, Split], list]:
    """-> ({"train": every captured image at pre.image_size, "val"/"test": empty}, no class names)."""
    table = read_one_model(path)
    keep = image_rows(table)
    if len(keep) == 0:
        raise DataError(f"traffic:{path}: no captured row holds an image (only tensor requests were captured)")
    images = images_of(table, keep[limit_indices(len(keep), limit)], pre)
    empty = Split(np.empty((0, pre.image_size, pre.image_size, 3), np.uint8), np.empty(0, np.int64))
    train = Split(images, np.full(len(images), -1, np.int64))
    return {"train": train, "val": empty, "test": empty}, []


__all__ = ["captured_heads", "check_capture", "load_captured", "read_one_model"]
