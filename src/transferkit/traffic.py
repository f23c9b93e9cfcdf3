"""Captured traffic on disk (`serve --capture DIR`, serving/capture.py writes it): its layout and its reader.

    DIR/<model>/<version>/part-<time>-<pid>-<n>.parquet     one committed part (hidden .part-*.tmp: being written)

One row per captured image: request_id, time (UTC), model, version, artifact, image_size, pixels (the model's
input, raw uint8 RGB, image_size x image_size), and per head `<head>_labels` / `<head>_scores` (top-5, best
first) and `<head>_logits`. Torch-free and below everything that reads it: `transferkit drift`, training on
traffic, a user's notebook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.preprocess import Preprocessing

TMP_PREFIX = ".part-"  # a part being written; never read, removed when found stale
PART_GLOB = "part-*.parquet"


def safe_name(name: str) -> str:
    """A model or version name as one folder name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "_"


def parts(root: str | Path, model: str | None = None) -> list[Path]:
    folder = Path(root) / safe_name(model) if model else Path(root)
    return sorted(folder.rglob(PART_GLOB))


def read_capture(root: str | Path, model: str | None = None):
    """Every committed part under `root` (one model's, if named) as one pyarrow Table, or None when there is none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in parts(root, model)]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def pixels_of(table, row: int) -> np.ndarray:
    """A captured row's image as the model saw it: (S, S, 3) uint8."""
    size = table.column("image_size")[row].as_py()
    return np.frombuffer(table.column("pixels")[row].as_py(), np.uint8).reshape(size, size, 3)


def image_rows(table) -> np.ndarray:
    """The rows that hold an image (a v2 request that sent tensors is captured without one)."""
    return np.flatnonzero(np.asarray(table.column("image_size").to_numpy(zero_copy_only=False)) > 0)


def images_of(table, rows: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Captured `rows` (each holding an image) as uint8 (len(rows), S, S, 3) at pre.image_size: as captured, or
    resized like any dataset's images when captured at another size (a capture may span two versions)."""
    sizes = np.asarray(table.column("image_size").to_numpy(zero_copy_only=False))[rows]
    pixels = table.column("pixels")
    images = np.empty((len(rows), pre.image_size, pre.image_size, 3), np.uint8)
    for size in np.unique(sizes):  # one decode and one resize per captured size
        at = np.flatnonzero(sizes == size)
        raw = b"".join(pixels[int(rows[i])].as_py() for i in at)
        stack = np.frombuffer(raw, np.uint8).reshape(len(at), int(size), int(size), 3)
        images[at] = stack if size == pre.image_size else pre.array_to_uint8(stack)
    return images


def logits_of(table, head: str) -> np.ndarray:
    """A head's captured logits, (rows, classes) float32."""
    return np.asarray(table.column(f"{head}_logits").to_pylist(), np.float32)
