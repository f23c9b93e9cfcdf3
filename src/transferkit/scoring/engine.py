"""Scoring on one machine: image files -> rows of top-k labels per head, as `/predict` would answer them.

`Scorer` holds what every engine needs, loaded once: the run's verified artifact (chosen as `serve --runtime`
chooses it, its files checked against the manifest's sha256), the run's `Preprocessing` and its labels. A file is
read, decoded and resized exactly as the server does it (the server's formats and pixel limit, the same JPEG
draft decode), normalized the same way, and answered by the same ranking (predictions.py), so a row holds the
labels and scores `/predict` gives for that file.

`local_batches` is the one-machine pipeline: decode in a pool of processes (start_decoders), each batch's
files split into one task per process; inference in `streams` threads, each
with a runtime of its own (ONNX Runtime and OpenVINO release the GIL while they run); the decode of the next
batches running while these are inferred. On a CPU there is one stream per core, each runtime on one thread:
at the batch sizes of bulk scoring, two single-threaded runs on two cores do more than one run on two threads
(the intra-op threads of a small model wait on each other), and this is the shape the machine's bound assumes.
At most PREFETCH + streams + 1 batches of pixels exist at a time, whatever the number of inputs. A file that
cannot be scored (missing, unreadable, not an image, corrupt, too large) is a row with its error and the batch
goes on without it.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import multiprocessing
import os
import queue
import signal
import stat
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import ImageDecodeError, ImageFormatError, ImageTooLargeError, TransferkitError
from transferkit.machine import cpu_count
from transferkit.manifest import Manifest, read_manifest
from transferkit.predictions import rank, top_labels
from transferkit.preprocess import MAX_UPLOAD_BYTES, Preprocessing
from transferkit.scoring.sources import Item

PREFETCH = 2  # batches decoding ahead of the one being inferred


class ScoreError(Exception):
    """One input that cannot be scored: `kind` is the row's error_kind, the message its error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def open_export(run_dir: Path) -> tuple[Path, Manifest]:
    """RUN -> (RUN/export, its manifest), or the error that says what to run first."""
    export_dir = run_dir / "export"
    if not (export_dir / "manifest.json").is_file():
        what = "does not exist" if not run_dir.is_dir() else "has no export"
        raise TransferkitError(f"run {run_dir} {what}; train it, then `transferkit export {run_dir}`")
    return export_dir, read_manifest(export_dir)


class Scorer:
    """`streams`: runtimes loaded side by side, for that many batches inferred at once (None: one per core on a
    CPU, one on a GPU); `threads`: runtime threads in all, shared out between the streams (None: one per core)."""

    def __init__(
        self, run_dir: str | Path, runtime: str = "auto", threads: int | None = None, streams: int | None = 1
    ) -> None:
        from transferkit.runtimes.selection import select_runtime

        self.run_dir = Path(run_dir)
        export_dir, self.manifest = open_export(self.run_dir)
        chosen = select_runtime(runtime, self.manifest, export_dir)
        self.artifact = chosen.artifact
        entry = self.manifest.artifacts[self.artifact]
        # read once and checked: every stream loads these bytes, never a file changed after export
        verified = self.manifest.read_verified(export_dir, entry.files)
        cores = cpu_count()
        if streams is None:  # one per core, never more than the threads asked for
            streams = 1 if type(chosen).device_kind(entry) == "gpu" else min(cores, threads or cores)
        self.streams = max(1, streams)
        per_stream = max(1, (threads or cores) // self.streams)
        runtimes = [chosen] + [
            select_runtime(self.artifact, self.manifest, export_dir) for _ in range(self.streams - 1)
        ]
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # the runtimes not running a batch right now
        for loaded in runtimes:
            loaded.threads = per_stream
            self._free.put(loaded.load(export_dir, self.manifest, verified))
        del verified
        self.runtime = runtimes[0]
        self.pre = self.manifest.preprocessing
        self.labels: dict[str, list[str]] = {h: list(c) for h, c in self.manifest.heads.items()}
        self.max_batch = self.manifest.artifacts[self.artifact].max_batch

    def identity(self) -> dict[str, Any]:
        """What the rows depend on: a resumed job must have the same (output.py)."""
        entry = self.manifest.artifacts[self.artifact]
        return {
            "run": str(self.run_dir.resolve()),
            "artifact": self.artifact,
            "artifact_sha256": [self.manifest.files[f].sha256 for f in entry.files if f in self.manifest.files],
            "preprocessing": self.pre.to_dict(),
        }

    def pixels(self, path: str) -> np.ndarray:
        """One file -> uint8 (S, S, 3), or ScoreError."""
        return read_pixels(self.pre, path)

    def infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B, S, S, 3) -> per head (B, C) ranked classes, in chunks the artifact accepts; thread-safe:
        each call takes a runtime no other call is using (waiting for one when all `streams` are busy)."""
        runtime = self._free.get()
        try:
            parts = [
                runtime.run(self.pre.normalize_numpy(pixels[i : i + self.max_batch]))
                for i in range(0, len(pixels), self.max_batch)
            ]
        finally:
            self._free.put(runtime)
        return {h: rank(np.concatenate([p[h] for p in parts])) for h in self.labels}

    def rows(
        self, items: list[Item], decoded: list[np.ndarray | ScoreError], top_k: int, with_truth: bool
    ) -> list[dict[str, Any]]:
        good = [i for i, d in enumerate(decoded) if not isinstance(d, ScoreError)]
        ranked = self.infer(np.stack([decoded[i] for i in good])) if good else {}
        position = {i: n for n, i in enumerate(good)}
        rows = []
        for i, (item, d) in enumerate(zip(items, decoded)):
            row: dict[str, Any] = {"path": item.path}
            for head, labels in self.labels.items():
                answer = top_labels(ranked[head][position[i]], labels, top_k) if i in position else None
                row[f"{head}_labels"] = [a["label"] for a in answer] if answer else None
                row[f"{head}_scores"] = [a["score"] for a in answer] if answer else None
                if with_truth:
                    row[f"{head}_true"] = (item.truth or {}).get(head)
            row["error"] = str(d) if isinstance(d, ScoreError) else None
            row["error_kind"] = d.kind if isinstance(d, ScoreError) else None
            rows.append(row)
        return rows


def read_pixels(pre: Preprocessing, path: str) -> np.ndarray:
    """One file -> uint8 (S, S, 3) as the server decodes it, or ScoreError naming what is wrong."""
    try:
        # opened without blocking, then checked on the descriptor: a FIFO, a device (/dev/zero) or a /proc file in a
        # list would hang the job or fill its memory, and a file swapped between a stat and an open is still caught
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a pipe, device or socket)"
                raise ScoreError("unreadable", f"{path}: {kind}, not an image file")
            if info.st_size > MAX_UPLOAD_BYTES:
                raise ScoreError(
                    "too large",
                    f"{path}: {info.st_size / 2**20:.1f} MB, over the {MAX_UPLOAD_BYTES >> 20} MB limit "
                    "the server has for one upload; downscale or re-encode it",
                )
            data = f.read(MAX_UPLOAD_BYTES + 1)  # bounded even if the file grows while it is read
            if len(data) > MAX_UPLOAD_BYTES:
                raise ScoreError("too large", f"{path}: grew past the {MAX_UPLOAD_BYTES >> 20} MB limit while read")
    except FileNotFoundError:
        raise ScoreError("missing", f"{path}: no such file") from None
    except IsADirectoryError:
        raise ScoreError("unreadable", f"{path}: a folder, not an image file") from None
    except OSError as exc:
        raise ScoreError("unreadable", f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return pre.decode_served(data, path)
    except ImageTooLargeError as exc:
        raise ScoreError("too large", str(exc)) from None
    except ImageFormatError as exc:
        raise ScoreError("format", str(exc)) from None
    except ImageDecodeError as exc:
        raise ScoreError(
            "not an image" if "not a recognised image" in str(exc) or "empty" in str(exc) else "corrupt", str(exc)
        ) from None


def decode_file(scorer: Scorer, path: str) -> np.ndarray | ScoreError:
    try:
        return scorer.pixels(path)
    except ScoreError as exc:
        return exc


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def decode_in_process(pre: Preprocessing, paths: list[str]) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
    """In a decode process: the files' pixels stacked (one array crosses the pipe, not one per file) and the
    errors as (position, kind, message)."""
    good, errors = [], []
    for i, path in enumerate(paths):
        try:
            good.append(read_pixels(pre, path))
        except ScoreError as exc:
            errors.append((i, exc.kind, str(exc)))
    size = pre.image_size
    return (np.stack(good) if good else np.empty((0, size, size, 3), np.uint8)), errors


def _ready() -> None:
    """A task that only makes the pool start its processes."""


def _die_with_parent(parent: int) -> None:
    """In a decode process: end when the scoring process ends, even by kill -9 (Linux PR_SET_PDEATHSIG; the
    signal follows the thread that forked, which is the one that called start_decoders). Without it a killed
    job would leave its decode processes waiting forever on a queue no one writes to."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)


def start_decoders(workers: int) -> ProcessPoolExecutor:
    """The decode processes, started now: call this before any runtime is loaded. They are forked (no
    re-import of the caller's main module, so `transferkit.score()` works from any script) while this process
    has no runtime threads yet; a fork taken later would copy threads and locks mid-use."""
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    )
    pool.submit(_ready).result()  # a fork pool starts every process at its first task
    return pool


def _from_process(result: tuple[np.ndarray, list[tuple[int, str, str]]], n: int) -> list[np.ndarray | ScoreError]:
    stacked, errors = result
    failed = {i: ScoreError(kind, message) for i, kind, message in errors}
    pixels = iter(stacked)
    return [failed[i] if i in failed else next(pixels) for i in range(n)]


def local_batches(
    scorer: Scorer,
    items: Iterable[Item],
    batch_size: int,
    decoders: ProcessPoolExecutor,
    workers: int,
    top_k: int,
    with_truth: bool,
) -> Iterator[list[dict[str, Any]]]:
    """Rows in input order, one list per batch: each batch decoded by the `workers` decode processes
    (start_decoders; Pillow's format parsers are Python that holds the GIL, so threads would decode small
    images one at a time), one task per worker, not per file (a task costs more than a small image's decode);
    then inferred by one of the scorer's streams; the decode of the next PREFETCH batches overlaps inference."""
    pre = scorer.pre  # a frozen dataclass: pickled to the decode processes as it is
    with ThreadPoolExecutor(max_workers=scorer.streams, thread_name_prefix="transferkit-infer") as infer_pool:
        pending: deque[Future] = deque()
        for batch in batched(items, batch_size):
            step = math.ceil(len(batch) / workers)
            paths = [[item.path for item in batch[i : i + step]] for i in range(0, len(batch), step)]
            decoding = [decoders.submit(decode_in_process, pre, chunk) for chunk in paths]
            sizes = [len(chunk) for chunk in paths]
            pending.append(infer_pool.submit(_finish, scorer, batch, decoding, sizes, top_k, with_truth))
            if len(pending) > PREFETCH + scorer.streams:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _finish(
    scorer: Scorer, batch: list[Item], decoding: list[Future], sizes: list[int], top_k: int, with_truth: bool
) -> list[dict]:
    decoded = [d for f, n in zip(decoding, sizes) for d in _from_process(f.result(), n)]
    return scorer.rows(batch, decoded, top_k, with_truth)
