"""`transferkit score` and `transferkit.score()`: many image files -> one predictions file, resumable.

    score(run, inputs)                      an iterator of rows (dicts), in input order
    score(run, inputs, out="preds.parquet")  writes the file (output.py) and returns a Summary
    score(run, inputs, out="preds.parquet", engine="ray")   the same rows from a Ray cluster (ray_engine.py)

Both run the same code as the command: sources.py lists the inputs, engine.py decodes and infers, output.py
commits parts and joins them. The defaults fit the machine: a decode process and a single-threaded inference
stream per core (engine.py says why), batches of 64. The ray engine runs engine.py's Scorer in a pool of Ray
actors instead and writes a folder of Parquet files.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from transferkit.errors import ConfigError
from transferkit.machine import cpu_count
from transferkit.scoring.engine import Scorer, local_batches, open_export, start_decoders
from transferkit.scoring.output import PartWriter, check_output, schema
from transferkit.scoring.sources import Item, iter_items, open_sources

BATCH_SIZE = 64
PART_ROWS = 8192  # rows per committed part: what a kill can cost, at most


@dataclass
class Summary:
    images: int = 0  # rows in the output (resumed ones included)
    resumed: int = 0  # rows committed by an earlier, interrupted run of the same job
    errors: Counter = field(default_factory=Counter)  # error_kind -> rows
    correct: Counter = field(default_factory=Counter)  # head -> rows whose top-1 is the true label
    labelled: Counter = field(default_factory=Counter)  # head -> rows with a true label and a prediction
    seconds: float = 0.0  # this run's wall time
    startup_seconds: float = 0.0  # of which: connecting to or starting Ray (the ray engine)
    artifact: str = ""
    out: Path | None = None

    def add(self, rows: list[dict[str, Any]], heads: list[str]) -> None:
        self.images += len(rows)
        for row in rows:
            if row["error_kind"]:
                self.errors[row["error_kind"]] += 1
                continue
            for head in heads:
                truth = row.get(f"{head}_true")
                if truth is not None:
                    self.labelled[head] += 1
                    self.correct[head] += row[f"{head}_labels"][0] == truth

    @property
    def images_per_second(self) -> float:
        return (self.images - self.resumed) / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        errors = ", ".join(f"{n} {kind}" for kind, n in self.errors.most_common()) or "none"
        lines = [
            f"scored {self.images:,} images with {self.artifact} in {self.seconds:.1f} s "
            f"({self.images_per_second:,.0f} img/s{f'; {self.resumed:,} resumed from an earlier run' if self.resumed else ''})",
            f"errors: {errors}",
        ]
        if self.startup_seconds:
            lines[0] += f"; Ray start-up {self.startup_seconds:.1f} s of it"
        for head in self.labelled:
            lines.append(
                f"accuracy {head}: {self.correct[head] / self.labelled[head]:.4f} "
                f"({self.correct[head]:,}/{self.labelled[head]:,})"
            )
        if self.out:
            lines.append(f"predictions: {self.out}")
        return "\n".join(lines)


ENGINES = ("local", "ray")


def _check(
    top_k: int,
    batch_size: int,
    workers: int | None,
    part_rows: int,
    engine: str,
    num_cpus: float | None,
    num_gpus: float,
) -> None:
    problems = []
    if engine not in ENGINES:
        problems.append(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if num_cpus is not None and num_cpus <= 0:
        problems.append(f"--num-cpus must be > 0, got {num_cpus}")
    if num_gpus < 0:
        problems.append(f"--num-gpus must be >= 0, got {num_gpus}")
    if not 1 <= top_k <= 100:
        problems.append(f"--top-k must be 1..100, got {top_k}")
    if batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {batch_size}")
    if part_rows < 1:
        problems.append(f"--part-rows must be >= 1, got {part_rows}")
    if workers is not None and workers < 1:
        problems.append(f"--workers must be >= 1, got {workers}")
    if problems:
        raise ConfigError("; ".join(problems))


def score(
    run: str | Path,
    inputs: list[str] | str,
    out: str | Path | None = None,
    *,
    top_k: int = 5,
    runtime: str = "auto",
    batch_size: int = BATCH_SIZE,
    workers: int | None = None,
    threads: int | None = None,
    part_rows: int = PART_ROWS,
    progress: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float = 0.0,
) -> Summary | Iterator[dict[str, Any]]:
    """Score every image in `inputs` (folders, globs, list files, imagefolder:PATH) with RUN's verified artifact.
    Without `out`: an iterator of rows. With it: the file written (resuming an interrupted run) and a Summary.
    engine="ray": `workers` actors (default: the cluster's CPUs / num_cpus), each with `num_cpus` CPUs (default
    1) and `num_gpus` GPUs, on the cluster at `ray_address` (default: a local Ray started for this job)."""
    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    _check(top_k, batch_size, workers, part_rows, engine, num_cpus, num_gpus)
    if engine == "ray":
        if out is None:
            raise ConfigError("the ray engine writes its rows to a Parquet folder; give out= (--out PREDS.parquet)")
        return _ray(
            Path(run),
            specs,
            Path(out),
            top_k,
            runtime,
            batch_size,
            workers,
            num_cpus or 1.0,
            num_gpus,
            ray_address,
            progress,
        )
    out_path = check_output(out) if out is not None else None
    workers = workers or cpu_count()
    decoders = start_decoders(workers)  # before the runtimes load: the processes are forked
    try:
        scorer = Scorer(run, runtime, threads=threads, streams=None)
        sources = open_sources([str(s) for s in specs], scorer.labels)
    except BaseException:
        decoders.shutdown(cancel_futures=True)
        raise
    with_truth = any(s.kind == "imagefolder" for s in sources)
    if out_path is None:
        return _rows(scorer, sources, batch_size, decoders, workers, top_k, with_truth)
    with decoders:
        return _write(scorer, sources, out_path, top_k, batch_size, decoders, workers, with_truth, part_rows, progress)


def _rows(
    scorer: Scorer, sources, batch_size: int, decoders, workers: int, top_k: int, with_truth: bool
) -> Iterator[dict[str, Any]]:
    with decoders:
        for rows in local_batches(scorer, iter_items(sources), batch_size, decoders, workers, top_k, with_truth):
            yield from rows


def _write(
    scorer: Scorer,
    sources,
    out: Path,
    top_k: int,
    batch_size: int,
    decoders,
    workers: int,
    with_truth: bool,
    part_rows: int,
    progress: bool,
) -> Summary:
    heads = list(scorer.labels)
    # parts end on batch boundaries: a resumed run forms the same batches, so its rows are the same to the bit
    part_rows = max(batch_size, part_rows // batch_size * batch_size)
    job = {
        **scorer.identity(),
        "inputs": [s.spec for s in sources],
        "top_k": top_k,
        "batch_size": batch_size,
        "part_rows": part_rows,
        "format": 1,
    }
    writer = PartWriter(out, schema(heads, with_truth), job)
    summary = Summary(artifact=scorer.artifact, out=out)
    last_path = None
    for table in writer.tables():  # an interrupted run's rows count in the summary
        rows = table.to_pylist()
        summary.add(rows, heads)
        last_path = rows[-1]["path"] if rows else last_path
    summary.resumed = summary.images
    total = sum(s.count() for s in sources)
    bar = Progress(total, summary.resumed, enabled=progress)
    start = time.monotonic()
    items = _resumed_items(iter_items(sources), summary.resumed, last_path, writer.parts_dir)
    pending: list[dict[str, Any]] = []
    for rows in local_batches(scorer, items, batch_size, decoders, workers, top_k, with_truth):
        pending += rows
        summary.add(rows, heads)
        bar.update(summary.images)
        if len(pending) >= part_rows:
            writer.commit(pending[:part_rows])
            pending = pending[part_rows:]
    if pending:
        writer.commit(pending)
    writer.finish()
    summary.seconds = time.monotonic() - start
    bar.close(summary.images)
    return summary


def _resumed_items(items: Iterator[Item], done: int, last_path: str | None, parts_dir: Path) -> Iterator[Item]:
    """The inputs after the `done` rows an interrupted run committed, once the last of those is checked to be
    the same input now: rows are skipped by position, so a folder that changed in between would otherwise shift
    every later row onto the wrong file without a word."""
    if done:
        now = next(itertools.islice(items, done - 1, None), None)
        if now is None or now.path != last_path:
            raise ConfigError(
                f"the inputs changed since the interrupted run: its row {done} was {last_path}, the same position "
                f"is now {now.path if now else 'past the end'}; delete {parts_dir} to score them from the start"
            )
    return items


def _ray(
    run: Path,
    specs: list,
    out: Path,
    top_k: int,
    runtime: str,
    batch_size: int,
    workers: int | None,
    num_cpus: float,
    num_gpus: float,
    address: str | None,
    progress: bool,
) -> Summary:
    """The ray engine: the driver resolves the artifact once (every actor loads that one), Ray scores."""
    from transferkit.runtimes.selection import select_runtime
    from transferkit.scoring.ray_engine import check_ray_output, ray_score

    check_ray_output(out)
    export_dir, manifest = open_export(run)
    artifact = select_runtime(runtime, manifest, export_dir).artifact
    heads = {h: list(c) for h, c in manifest.heads.items()}
    sources = open_sources([str(s) for s in specs], heads)
    with_truth = any(s.kind == "imagefolder" for s in sources)
    start = time.monotonic()
    job = ray_score(
        run,
        sources,
        out,
        runtime=artifact,
        top_k=top_k,
        batch_size=batch_size,
        actors=workers,
        cpus_per_actor=num_cpus,
        gpus_per_actor=num_gpus,
        address=address,
        with_truth=with_truth,
        progress=progress,
    )
    summary = Summary(
        artifact=artifact, out=out, seconds=time.monotonic() - start, startup_seconds=job["startup_seconds"]
    )
    columns = ["error_kind", *(f"{h}_labels" for h in heads), *(f"{h}_true" for h in heads if with_truth)]
    for part in sorted(out.glob("part-*.parquet")):
        summary.add(pq.read_table(part, columns=columns).to_pylist(), list(heads))
    return summary


class Progress:
    """img/s and ETA on stderr: redrawn in place on a terminal, else one line every LOG_EVERY_S."""

    LOG_EVERY_S = 30.0

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.start_done, self.enabled = total, done, enabled
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < (0.5 if self.tty else self.LOG_EVERY_S):
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        line = (
            f"scored {done:,}/{self.total:,} ({100 * done / max(self.total, 1):.1f}%)  {rate:,.0f} img/s  "
            f"ETA {_clock(eta)}"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self, done: int) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
