"""Traffic capture (`serve --capture DIR`): a sample of what the model saw and answered, kept for drift checks and
for adapting the model to the traffic it gets.

For a sampled request, each image is kept as the model saw it (the preprocessed uint8 pixels at the model's input
size, not the upload: small, and it carries less of the original), with every head's top-k labels and scores and
its logits, the model, version and artifact that answered, the request id and the time. Rows are written by one
background thread per worker as Parquet parts, DIR/<model>/<version>/part-<time>-<pid>-<n>.parquet, each written
to a hidden temporary name and renamed when whole, so a killed server leaves only whole parts. The folder is kept
under --capture-max-mb by deleting the oldest parts first (every worker enforces the same bound on the same
folder).

Capture never blocks or fails a request: the request thread only draws the sample and appends references to a
queue bounded in bytes; when the writer falls behind or a part cannot be written, rows are dropped and counted
(`transferkit_capture_dropped_rows_total{reason}` on /metrics), never waited for.

What is stored is personal data when the images are: capture is off unless --capture is given, and deleting DIR
(or any part) removes it; docs/guide-serving.md says so for operators.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.traffic import TMP_PREFIX, safe_name

logger = logging.getLogger("transferkit.capture")

PART_ROWS = 512  # rows per part at most: a part is written when this many are waiting, or every FLUSH_S
FLUSH_S = 2.0
PENDING_BYTES = 64 << 20  # pixels waiting for the writer, per worker; past it, new rows are dropped
TOP_K = 5


@dataclass
class _Row:
    model: str
    version: str
    artifact: str
    request_id: str
    time: float
    pixels: np.ndarray | None  # (S, S, 3) uint8, or None for a request that sent model input tensors
    heads: dict[str, tuple[np.ndarray, np.ndarray]]  # head -> (ranked (C, 2) [class, score], logits (C,))
    labels: dict[str, list[str]]

    @property
    def nbytes(self) -> int:
        return (0 if self.pixels is None else self.pixels.nbytes) + sum(
            a.nbytes + b.nbytes for a, b in self.heads.values()
        )


class Capture:
    """One worker's capture: `offer` from the event loop, a writer thread for the files."""

    def __init__(
        self,
        root: str | Path,
        rate: float,
        max_bytes: int,
        on_drop: Any = None,
        on_write: Any = None,
        on_rows: Any = None,
    ):
        self.root = Path(root)
        self.rate = rate
        self.max_bytes = max_bytes
        self.on_drop = on_drop or (lambda reason, n: None)  # /metrics counters (service.py)
        self.on_write = on_write or (lambda n: None)
        # (head, top-1 label, top-1 score, classes) of each written row, for the live signals on /metrics: computed here,
        # in the writer thread, on the sample, so the request path pays nothing for them
        self.on_rows = on_rows or (lambda model, version, top1: None)
        self._rows: deque[_Row] = deque()
        self._pending = 0
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()  # drops are counted from the event loop and the writer
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self.written = 0  # rows in parts this worker committed
        self.dropped: dict[str, int] = {}
        try:
            import pyarrow.parquet  # noqa: F401 - refused at start, not as dropped rows later
        except ImportError:
            raise RuntimeError("--capture writes Parquet and needs pyarrow: pip install 'pyarrow>=14.0.1'") from None
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="transferkit-capture", daemon=True)
        self._thread.start()

    # ---- the request side: cheap, never blocks ---------------------------------------------------------
    def offer(self, served: Any, batch: np.ndarray, answer: dict, request_id: str, ranked: str, logits: str) -> None:
        """A request's images and answer (rows of `ServedVersion.run_batch`'s output): each image kept with
        probability `rate`. References only: the arrays are the request's own and are not written to after."""
        n = len(batch)
        chosen = [i for i in range(n) if self.rate >= 1.0 or random.random() < self.rate]
        if not chosen:
            return
        now = time.time()
        pixels = batch if batch.dtype == np.uint8 else None  # v2's FP32 tensors: the answer without the image
        for i in chosen:
            row = _Row(
                served.name,
                served.version,
                served.runtime_name,
                request_id,
                now,
                None if pixels is None else pixels[i],
                {h: (answer[h, ranked][i], answer[h, logits][i]) for h in served.labels},
                served.labels,
            )
            with self._lock:
                kept = self._pending + row.nbytes <= PENDING_BYTES
                if kept:
                    self._rows.append(row)
                    self._pending += row.nbytes
                waiting = len(self._rows)
            if not kept:
                self._drop("writer behind", 1)
            elif waiting >= PART_ROWS:
                self._wake.set()

    def _drop(self, reason: str, n: int) -> None:
        with self._count_lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.on_drop(reason, n)

    # ---- the writer thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        self._remove_stale_temporaries()
        while not self._stop.is_set():
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write what is waiting as parts (one per model version), then keep the folder within its budget."""
        with self._lock:
            rows, self._rows, self._pending = list(self._rows), deque(), 0
        groups: dict[tuple[str, str], list[_Row]] = {}
        for row in rows:
            groups.setdefault((row.model, row.version), []).append(row)
        for (model, version), group in groups.items():
            for start in range(0, len(group), PART_ROWS):
                part = group[start : start + PART_ROWS]
                try:
                    self._write_part(model, version, part)
                except Exception as exc:  # noqa: BLE001 - a full disk or a removed folder drops rows, never a request
                    logger.warning("capture: %d rows of %s:%s not written: %s", len(part), model, version, exc)
                    self._drop("write failed", len(part))
                    continue
                self.written += len(part)
                self.on_write(len(part))
                self.on_rows(model, version, _top1(part))
        if rows:
            self._rotate()

    def close(self) -> None:
        """Stop the writer after writing what is waiting (the drain calls this after the last request)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()

    def _write_part(self, model: str, version: str, rows: list[_Row]) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.root / safe_name(model) / safe_name(version)
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(rows[0].time))}-{os.getpid()}-{self._seq:06d}"
        columns: dict[str, Any] = {
            "request_id": pa.array([r.request_id for r in rows], pa.string()),
            "time": pa.array([int(r.time * 1e6) for r in rows], pa.timestamp("us", tz="UTC")),
            "model": pa.array([r.model for r in rows], pa.string()),
            "version": pa.array([r.version for r in rows], pa.string()),
            "artifact": pa.array([r.artifact for r in rows], pa.string()),
            "image_size": pa.array([0 if r.pixels is None else r.pixels.shape[0] for r in rows], pa.int32()),
            "pixels": pa.array([None if r.pixels is None else r.pixels.tobytes() for r in rows], pa.binary()),
        }
        for head, labels in rows[0].labels.items():
            ranked = [r.heads[head][0][:TOP_K] for r in rows]
            columns[f"{head}_labels"] = pa.array(
                [[labels[int(c)] for c, _ in k] for k in ranked], pa.list_(pa.string())
            )
            columns[f"{head}_scores"] = pa.array([[float(s) for _, s in k] for k in ranked], pa.list_(pa.float32()))
            columns[f"{head}_logits"] = pa.array([r.heads[head][1].tolist() for r in rows], pa.list_(pa.float32()))
        table = pa.table(columns)
        tmp = folder / f"{TMP_PREFIX}{name}.tmp"
        final = folder / f"{name}.parquet"
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible, so a crash leaves it whole
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def _rotate(self) -> None:
        """Delete the oldest parts (of every worker and model) until the folder fits --capture-max-mb."""
        parts = []
        for path in self.root.rglob("part-*.parquet"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another worker rotated it away
                continue
            parts.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in parts)
        for _, size, path in sorted(parts):
            if total <= self.max_bytes:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            total -= size

    def _remove_stale_temporaries(self) -> None:
        """A part a killed worker was writing: never renamed, so never read; removed after a minute."""
        cutoff = time.time() - 60
        for path in self.root.rglob(f"{TMP_PREFIX}*.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                pass


def _top1(rows: list[_Row]) -> list[tuple[str, str, float, int]]:
    """(head, top-1 label, its score, the head's number of classes) per row and head."""
    return [
        (head, row.labels[head][int(ranked[0][0])], float(ranked[0][1]), len(row.labels[head]))
        for row in rows
        for head, (ranked, _) in row.heads.items()
    ]
