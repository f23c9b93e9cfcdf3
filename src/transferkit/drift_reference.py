"""Drift's reference, stored with each artifact that passes the gate: its own softmax outputs on held-out images.

`transferkit drift` and the server's live drift score (serving/drift_monitor.py) compare what a model answers on
traffic with what it answered on its held-out test images. The gate has just run the artifact on exactly those
images (every head on every dataset's test images, as traffic mixes them), so keeping a seeded sample of its
outputs costs nothing at export and nothing at serve time: no dataset needs to be on the serving machine, and
the reference comes from the same artifact, at the same precision, as the answers it is compared with.

    reference-<artifact>.npz    softmax/<head>: float32 (rows, classes); meta: JSON {artifact, rows, images}

The file is listed in the artifact's manifest entry (`reference`), hashed like its other files, stored and
registered with it, and read through `Manifest.read_verified` (torch-free: `load_reference`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from transferkit.manifest import ArtifactEntry, FileRecord, Manifest
from transferkit.shift import softmax
from transferkit.utils import atomic_write

REFERENCE_ROWS = 4000  # outputs kept: enough for the tests at 1% to see a few-point shift, small on disk
REFERENCE_BYTES = 16 << 20  # and at most this much (a head of 1,000 classes keeps fewer rows)
SEED = 0


def reference_name(artifact: str) -> str:
    return f"reference-{artifact}.npz"


def write_reference(export_dir: Path, artifact: str, logits: dict[str, np.ndarray], images: dict) -> FileRecord:
    """A seeded sample of the rows of `logits` (every head on the same images) as softmax outputs -> the file's
    record. `images`: how many held-out images of each dataset the rows came from (said in the file)."""
    rows = len(next(iter(logits.values())))
    per_row = 4 * sum(v.shape[1] for v in logits.values())
    keep = min(rows, REFERENCE_ROWS, max(500, REFERENCE_BYTES // per_row))
    picked = np.sort(np.random.default_rng(SEED).choice(rows, keep, replace=False))
    arrays = {f"softmax/{h}": softmax(v[picked].astype(np.float64)).astype(np.float32) for h, v in logits.items()}
    meta = {"artifact": artifact, "rows": int(keep), "images": images}
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    path = Path(export_dir) / reference_name(artifact)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return FileRecord.of(path)


def load_reference(export_dir: Path, manifest: Manifest, entry: ArtifactEntry) -> dict[str, np.ndarray] | None:
    """The artifact's stored reference, per head (hash-checked; ArtifactMismatchError when it does not match its
    record), or None when the export has none (made before references were stored)."""
    if not entry.reference:
        return None
    data = manifest.read_verified(export_dir, [entry.reference])[entry.reference]
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key.split("/", 1)[1]: npz[key] for key in npz.files if key.startswith("softmax/")}


__all__ = ["load_reference", "reference_name", "write_reference"]
