"""Scoring on one machine: image files -> rows of top-k labels per head, as `/predict` would answer them.

`Scorer` holds what every engine needs, loaded once: the run's verified artifact (chosen as `serve --runtime`
chooses it, its files checked against the manifest's sha256), the run's `Preprocessing` and its labels. A file is
read, decoded and resized exactly as the server does it (the server's formats and pixel limit, the same JPEG
draft decode), normalized the same way, and answered by the same ranking (predictions.py), so a row holds the
labels and scores `/predict` gives for that file.

`local_batches` is the one-machine pipeline: decode in a thread pool (Pillow releases the GIL while it decodes
and resizes), the runtime on large batches in the calling thread, and the decode of the next batches running
while this one is inferred. At most PREFETCH + 1 batches of pixels exist at a time, whatever the number of
inputs. A file that cannot be scored (missing, unreadable, not an image, corrupt, too large) is a row with its
error and the batch goes on without it.
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from transferkit.errors import ImageDecodeError, ImageFormatError, ImageTooLargeError, TransferkitError
from transferkit.manifest import read_manifest
from transferkit.predictions import rank, top_labels
from transferkit.preprocess import Preprocessing
from transferkit.scoring.sources import Item
from transferkit.serving.settings import MAX_UPLOAD_BYTES

PREFETCH = 2  # batches decoding ahead of the one being inferred


class ScoreError(Exception):
    """One input that cannot be scored: `kind` is the row's error_kind, the message its error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Scorer:
    def __init__(self, run_dir: str | Path, runtime: str = "auto", threads: int | None = None) -> None:
        from transferkit.serving.runtime import load_runtime

        self.run_dir = Path(run_dir)
        export_dir = self.run_dir / "export"
        if not (export_dir / "manifest.json").is_file():
            what = "does not exist" if not self.run_dir.is_dir() else "has no export"
            raise TransferkitError(f"run {run_dir} {what}; train it, then `transferkit export {run_dir}`")
        self.manifest = read_manifest(export_dir)
        self.runtime = load_runtime(runtime, export_dir, self.manifest, threads=threads, check_files=True)
        self.artifact = self.runtime.artifact
        self.pre = Preprocessing.from_dict(self.manifest.preprocessing)
        self.labels: dict[str, list[str]] = {h: list(c) for h, c in self.manifest.heads.items()}
        self.max_batch = self.manifest.artifacts[self.artifact].max_batch

    def identity(self) -> dict[str, Any]:
        """What the rows depend on: a resumed job must have the same (output.py)."""
        entry = self.manifest.artifacts[self.artifact]
        return {"run": str(self.run_dir.resolve()), "artifact": self.artifact,
                "artifact_sha256": [self.manifest.files[f].sha256 for f in entry.files if f in self.manifest.files],
                "preprocessing": self.pre.to_dict()}  # fmt: skip

    def pixels(self, path: str) -> np.ndarray:
        """One file -> uint8 (S, S, 3), or ScoreError."""
        try:
            size = os.stat(path).st_size
            if size > MAX_UPLOAD_BYTES:
                raise ScoreError("too large", f"{path}: {size / 2**20:.1f} MB, over the {MAX_UPLOAD_BYTES >> 20} MB limit "
                                              "the server has for one upload; downscale or re-encode it")  # fmt: skip
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ScoreError("missing", f"{path}: no such file") from None
        except IsADirectoryError:
            raise ScoreError("unreadable", f"{path}: a folder, not an image file") from None
        except OSError as exc:
            raise ScoreError("unreadable", f"{path}: cannot be read ({exc.strerror or exc})") from None
        try:
            return self.pre.decode_served(data, path)
        except ImageTooLargeError as exc:
            raise ScoreError("too large", str(exc)) from None
        except ImageFormatError as exc:
            raise ScoreError("format", str(exc)) from None
        except ImageDecodeError as exc:
            raise ScoreError("not an image" if "not a recognised image" in str(exc) or "empty" in str(exc)
                             else "corrupt", str(exc)) from None  # fmt: skip

    def infer(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (B, S, S, 3) -> per head (B, C) ranked classes, in chunks the artifact accepts."""
        parts = [self.runtime.run(self.pre.normalize_numpy(pixels[i : i + self.max_batch]))
                 for i in range(0, len(pixels), self.max_batch)]  # fmt: skip
        return {h: rank(np.concatenate([p[h] for p in parts])) for h in self.labels}

    def rows(self, items: list[Item], decoded: list[np.ndarray | ScoreError], top_k: int,
             with_truth: bool) -> list[dict[str, Any]]:  # fmt: skip
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


def decode_file(scorer: Scorer, path: str) -> np.ndarray | ScoreError:
    try:
        return scorer.pixels(path)
    except ScoreError as exc:
        return exc


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def local_batches(scorer: Scorer, items: Iterable[Item], batch_size: int, workers: int, top_k: int,
                  with_truth: bool) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
    """Rows in input order, one list per batch; the decode of the next PREFETCH batches overlaps inference."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transferkit-decode") as pool:
        pending: deque[tuple[list[Item], list[Future]]] = deque()
        for batch in batched(items, batch_size):
            pending.append((batch, [pool.submit(decode_file, scorer, item.path) for item in batch]))
            if len(pending) > PREFETCH:
                yield _finish(scorer, *pending.popleft(), top_k, with_truth)
        while pending:
            yield _finish(scorer, *pending.popleft(), top_k, with_truth)


def _finish(scorer: Scorer, batch: list[Item], futures: list[Future], top_k: int, with_truth: bool) -> list[dict]:
    return scorer.rows(batch, [f.result() for f in futures], top_k, with_truth)
