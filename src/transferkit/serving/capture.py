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
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.traffic import TMP_PREFIX, safe_name

logger = logging.getLogger("transferkit.capture")

PART_ROWS = 512  # a part is written when this many rows are waiting, or every FLUSH_S
FLUSH_S = 2.0
PENDING_BYTES = 64 << 20  # pixels waiting for the writer, per worker; past it, new rows are dropped
TOP_K = 5


@dataclass
class _Sample:
    """One request's sampled images and their answers, as references to the request's own arrays."""

    model: str
    version: str
    artifact: str
    request_id: str
    time: float
    pixels: np.ndarray | None  # (k, S, S, 3) uint8, or None for a request that sent model input tensors
    heads: dict[str, tuple[np.ndarray, np.ndarray]]  # head -> (ranked (k, C) predictions.RANKED, logits (k, C))
    labels: dict[str, list[str]]
    reference: dict[str, np.ndarray] | None = None  # the version's drift reference (drift_monitor.py), if any

    def __len__(self) -> int:
        return len(next(iter(self.heads.values()))[1])

    @property
    def nbytes(self) -> int:
        held = 0 if self.pixels is None else self.pixels.nbytes
        return held + sum(a.nbytes + b.nbytes for a, b in self.heads.values())


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
        on_outputs: Any = None,
    ):
        self.root = Path(root)
        self.rate = rate
        self.max_bytes = max_bytes
        self.on_drop = on_drop or (lambda reason, n: None)  # /metrics counters (service.py)
        self.on_write = on_write or (lambda n: None)
        # per head, the written rows' top-1 labels and scores, for the live signals on /metrics: computed here,
        # in the writer thread, on the sample, so the request path pays nothing for them
        self.on_rows = on_rows or (lambda model, version, top1: None)
        # the live drift score (drift_monitor.py): a version's reference and the written rows' logits per head
        self.on_outputs = on_outputs or (lambda model, version, reference, logits: None)
        self._rows: deque[_Sample] = deque()
        self._pending = 0  # bytes of the samples waiting
        self._waiting = 0  # their rows
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
        if self.rate >= 1.0:
            chosen: Any = slice(None)
        else:
            picked = np.flatnonzero(np.random.random(n) < self.rate)
            if len(picked) == 0:
                return
            chosen = slice(picked[0], picked[0] + 1) if len(picked) == 1 else picked
        pixels = batch[chosen] if batch.dtype == np.uint8 else None  # v2's FP32 tensors: the answer, no image
        sample = _Sample(
            served.name,
            served.version,
            served.runtime_name,
            request_id,
            time.time(),
            pixels,
            {h: (answer[h, ranked][chosen], answer[h, logits][chosen]) for h in served.labels},
            served.labels,
            getattr(served, "reference", None),
        )
        size = sample.nbytes
        with self._lock:
            kept = self._pending + size <= PENDING_BYTES
            if kept:
                self._rows.append(sample)
                self._pending += size
                self._waiting += len(sample)
            waiting = self._waiting
        if not kept:
            self._drop("writer behind", len(sample))
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
            samples, self._rows, self._pending, self._waiting = list(self._rows), deque(), 0, 0
        groups: dict[tuple[str, str, bool], list[_Sample]] = {}
        for sample in samples:  # a part holds one model version, with pixels or without
            groups.setdefault((sample.model, sample.version, sample.pixels is None), []).append(sample)
        for (model, version, _), group in groups.items():
            rows = sum(len(g) for g in group)
            try:
                self._write_part(model, version, group)
            except Exception as exc:  # noqa: BLE001 - a full disk or a removed folder drops rows, never a request
                logger.warning("capture: %d rows of %s:%s not written: %s", rows, model, version, exc)
                self._drop("write failed", rows)
                continue
            self.written += rows
            self.on_write(rows)
            self.on_rows(model, version, _top1(group))
            if group[0].reference is not None:
                logits = {h: np.concatenate([g.heads[h][1] for g in group]) for h in group[0].labels}
                try:
                    self.on_outputs(model, version, group[0].reference, logits)
                except Exception as exc:  # noqa: BLE001 - a signal lost, never the writer
                    logger.warning("capture: drift score of %s:%s not computed: %s", model, version, exc)
        if samples:
            self._rotate()

    def close(self) -> None:
        """Stop the writer after writing what is waiting (the drain calls this after the last request)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()

    def _write_part(self, model: str, version: str, group: list[_Sample]) -> Path:
        """One Parquet part from the samples of one model version, built from whole arrays (no Python loop
        per row: the writer shares the GIL with the worker's event loop)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.root / safe_name(model) / safe_name(version)
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"part-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(group[0].time))}-{os.getpid()}-{self._seq:06d}"
        counts = [len(g) for g in group]
        n = sum(counts)

        def repeated(values: list, kind: Any) -> Any:
            return pa.array(np.repeat(np.asarray(values, dtype=object), counts), kind)

        micros = np.repeat(np.array([int(g.time * 1e6) for g in group], np.int64), counts)
        columns: dict[str, Any] = {
            "request_id": repeated([g.request_id for g in group], pa.string()),
            "time": pa.array(micros).cast(pa.timestamp("us", tz="UTC")),
            "model": repeated([g.model for g in group], pa.string()),
            "version": repeated([g.version for g in group], pa.string()),
            "artifact": repeated([g.artifact for g in group], pa.string()),
        }
        if group[0].pixels is None:
            columns["image_size"] = pa.array(np.zeros(n, np.int32))
            columns["pixels"] = pa.nulls(n, pa.binary())
        else:
            pixels = np.ascontiguousarray(np.concatenate([g.pixels for g in group]))
            columns["image_size"] = pa.array(np.full(n, pixels.shape[1], np.int32))
            columns["pixels"] = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(pixels[0].nbytes), n, [None, pa.py_buffer(pixels)]
            ).cast(pa.binary())
        for head, labels in group[0].labels.items():
            ranked = np.concatenate([g.heads[head][0] for g in group])[:, :TOP_K]  # (n, k) predictions.RANKED
            logits = np.ascontiguousarray(np.concatenate([g.heads[head][1] for g in group]), np.float32)
            k, classes = ranked.shape[1], logits.shape[1]
            top = pa.array(ranked["index"].astype(np.int32).ravel())
            names = pa.DictionaryArray.from_arrays(top, pa.array(labels, pa.string())).cast(pa.string())
            scores = pa.array(ranked["score"].astype(np.float32).ravel())
            columns[f"{head}_labels"] = pa.FixedSizeListArray.from_arrays(names, k).cast(pa.list_(pa.string()))
            columns[f"{head}_scores"] = pa.FixedSizeListArray.from_arrays(scores, k).cast(pa.list_(pa.float32()))
            flat = pa.array(logits.ravel())
            columns[f"{head}_logits"] = pa.FixedSizeListArray.from_arrays(flat, classes).cast(pa.list_(pa.float32()))
        tmp = folder / f"{TMP_PREFIX}{name}.tmp"
        final = folder / f"{name}.parquet"
        pq.write_table(pa.table(columns), tmp, compression="zstd")
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


def _top1(group: list[_Sample]) -> dict[str, tuple[list[str], np.ndarray, int]]:
    """Per head: the written rows' top-1 labels, their scores, and the head's number of classes."""
    out = {}
    for head, labels in group[0].labels.items():
        best = np.concatenate([g.heads[head][0][:, 0] for g in group])  # (n,) predictions.RANKED
        names = np.asarray(labels, dtype=object)[best["index"].astype(np.int64)]
        out[head] = (names.tolist(), best["score"].astype(np.float32), len(labels))
    return out
