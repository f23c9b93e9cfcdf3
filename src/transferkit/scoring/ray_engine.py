"""`transferkit score --engine ray`: the same rows as the local engine, on a Ray cluster through Ray Data.

    inputs  -> Arrow tables in Ray's object store      the listing (input_index, path, truth), streamed by the driver
            -> ray.data.from_arrow_refs                  one block per listing table, in input order
            -> map_batches(BatchScorer, ActorPoolStrategy) each actor loads the verified artifact once (engine.Scorer:
                                                         same sha256 checks, Preprocessing and ranking as /predict)
            -> write_parquet(OUT.staging-<id>/rows)     Ray's own writer, on whichever node scored the block
            -> checked, renamed into OUT/part-NNNNNN.parquet in input order, then OUT appears in one rename

The output is a folder of Parquet files that pyarrow, pandas, Spark and Ray read as one table: the local
engine's columns plus `input_index` (the row's position in the inputs, for joins that must not rely on file
order). Nothing is half written: OUT appears only after the driver has checked that every input index is
there exactly once; a job that fails (a node lost for good, the driver killed) leaves OUT as it was and the
staging folder behind, which the next run removes. Ray Data retries the tasks of a lost node on the nodes that
remain; a pool that can no longer make progress ends the job with an error (`NO_PROGRESS_TIMEOUT_S`) instead
of waiting forever.

The listing parts hold a multiple of the batch size, and each part is one block, so the actors see the same
batches as the local engine and the rows are the same to the bit. On a cluster of several machines, the images,
the run folder and OUT must be at the same paths on every node (a shared filesystem), as Ray's own file
readers require of local paths.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from transferkit.errors import ConfigError, TransferkitError
from transferkit.machine import cpu_count
from transferkit.scoring.engine import ScoreError, Scorer, decode_file
from transferkit.scoring.output import schema
from transferkit.scoring.sources import Item, Source, iter_items

LISTING_SCHEMA = pa.schema([("input_index", pa.int64()), ("path", pa.string()), ("truth", pa.string())])
MAX_LISTING_ROWS = 16384  # inputs per block: the most a lost node's task makes Ray redo
NO_PROGRESS_TIMEOUT_S = 300.0  # a job whose operators move nothing for this long fails instead of hanging


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra (pyarrow, pandas) comes with it
    except ImportError:
        raise ConfigError(
            "--engine ray needs Ray Data: pip install 'transferkit[ray]' (or pip install 'ray[data]')"
        ) from None
    return ray


def check_ray_output(out: Path) -> None:
    if out.suffix.lower() != ".parquet":
        raise ConfigError(
            f"--out {out}: the ray engine writes a folder of Parquet files (Ray's write_parquet); "
            f"name it like {out.with_suffix('.parquet').name}"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out} is a file; the ray engine writes a folder there. Remove it or choose another name"
        )
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist; create it first")


class BatchScorer:
    """Ray Data's callable class: one per actor, the artifact loaded once, a batch of listing rows -> rows."""

    def __init__(self, run: str, runtime: str, threads: int, decode_threads: int, top_k: int, with_truth: bool) -> None:
        self.scorer = Scorer(run, runtime, threads=threads)
        self.pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="transferkit-decode")
        self.top_k, self.with_truth = top_k, with_truth
        self.schema = schema(list(self.scorer.labels), with_truth)

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        items = [Item(p, json.loads(t) if t else None) for p, t in zip(paths, batch.column("truth").to_pylist())]
        decoded: list[Any] = list(self.pool.map(lambda p: decode_file(self.scorer, p), paths))
        rows = self.scorer.rows(items, decoded, self.top_k, self.with_truth)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        return table.append_column("input_index", batch.column("input_index"))


def put_listing(ray, sources: list[Source], rows_per_part: int) -> tuple[list, int]:
    """Stream the inputs into the object store as Arrow tables of rows_per_part rows (one block each): the
    driver never holds the whole list, and every node can read it. Returns the refs (in order) and the count."""
    parts: list = []
    chunk: list[dict[str, Any]] = []
    count = 0

    def flush() -> None:
        parts.append(ray.put(pa.Table.from_pylist(chunk, schema=LISTING_SCHEMA)))
        chunk.clear()

    for index, item in enumerate(iter_items(sources)):
        chunk.append({"input_index": index, "path": item.path, "truth": json.dumps(item.truth) if item.truth else None})
        count = index + 1
        if len(chunk) == rows_per_part:
            flush()
    if chunk:
        flush()
    return parts, count


def listing_rows(total: int, batch_size: int, actors: int) -> int:
    """Rows per listing part: about four blocks per actor (Ray balances blocks, not rows), a multiple of the
    batch size (the local engine's batches), at most MAX_LISTING_ROWS."""
    per_block = math.ceil(max(total, 1) / (4 * max(actors, 1)))
    per_block = min(max(per_block, batch_size), max(MAX_LISTING_ROWS, batch_size))
    return math.ceil(per_block / batch_size) * batch_size


def connect(address: str | None):
    """(ray, whether this call connected): the Ray this process already uses, else the cluster at `address`
    ("auto" finds a local one), else a local Ray on 127.0.0.1 of this job's own, every core."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=cpu_count(), _node_ip_address="127.0.0.1", **kwargs)  # this process's CPUs
    except ConnectionError as exc:
        raise ConfigError(
            f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
            "`ray start --head`, or leave --ray-address out to start a local Ray"
        ) from None
    return ray, True


def _check_reachable(address: str) -> None:
    """Refuse an address nothing listens on at once (ray.init would retry it for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--ray-address {address}: no Ray cluster answers there ({exc}); start one with "
            "`ray start --head`, or leave --ray-address out to start a local Ray"
        ) from None


def ray_score(
    run: Path,
    sources: list[Source],
    out: Path,
    *,
    runtime: str,
    top_k: int,
    batch_size: int,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float,
    address: str | None,
    with_truth: bool,
    progress: bool,
) -> dict[str, Any]:
    """Score every input on Ray and commit OUT; returns the row count, the number of actors and the seconds
    spent connecting to (or starting) Ray."""
    check_ray_output(out)
    started = time.monotonic()
    ray, connected = connect(address)
    startup = time.monotonic() - started
    try:
        done = _run(
            ray,
            run,
            sources,
            out,
            runtime=runtime,
            top_k=top_k,
            batch_size=batch_size,
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            with_truth=with_truth,
            progress=progress,
        )
        return {**done, "startup_seconds": startup}
    finally:
        if connected:  # a Ray this job started (or joined) is left as it was found: no process stays behind
            ray.shutdown()


def _run(
    ray,
    run: Path,
    sources: list[Source],
    out: Path,
    *,
    runtime: str,
    top_k: int,
    batch_size: int,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float,
    with_truth: bool,
    progress: bool,
) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy, DataContext

    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    if actors is None:
        actors = max(1, int(cluster_cpus // max(cpus_per_actor, 1e-9)))
    for stale in out.parent.glob(f"{out.name}.staging-*"):  # what a failed or killed earlier job left
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.with_name(f"{out.name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        total = sum(s.count() for s in sources)
        parts, total = put_listing(ray, sources, listing_rows(total, batch_size, actors))
        if not total:
            raise ConfigError(f"the inputs ({', '.join(s.spec for s in sources)}) hold no image files to score")
        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = progress
        if "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S" not in os.environ:  # Ray's own setting wins
            ctx.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
        threads = max(1, int(cpus_per_actor))
        rows = ray.data.from_arrow_refs(parts).map_batches(
            BatchScorer,
            fn_constructor_kwargs={
                "run": str(run.resolve()),
                "runtime": runtime,
                "threads": threads,
                "decode_threads": threads,
                "top_k": top_k,
                "with_truth": with_truth,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
        )
        # writing takes no CPU of its own: the actors hold every CPU the pool asks for, and a write task that
        # waited for a free one would wait forever
        rows.write_parquet(str(staging / "rows"), ray_remote_args={"num_cpus": 0})
        _commit(staging / "rows", out, total)
    except Exception as exc:
        if isinstance(exc, (TransferkitError, ScoreError)):
            raise
        raise TransferkitError(f"the Ray job failed, {out} is unchanged: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"rows": total, "actors": actors}


def _commit(rows_dir: Path, out: Path, total: int) -> None:
    """Check that every input is there exactly once, name the files in input order, then swap OUT in."""
    files = []
    seen = 0
    for path in rows_dir.glob("*.parquet"):
        index = pq.read_table(path, columns=["input_index"]).column(0).to_numpy()
        if len(index):
            if (index[1:] <= index[:-1]).any():
                raise TransferkitError(f"{path}: rows out of input order; the job's output is not used")
            files.append((int(index[0]), int(index[-1]), len(index), path))
            seen += len(index)
    files.sort()
    expected = 0
    for first, last, n, path in files:
        if first != expected or last != expected + n - 1:
            raise TransferkitError(
                f"the Ray job's output is missing or repeats rows from input {expected} "
                f"({path.name} starts at {first}); {out} is unchanged"
            )
        expected += n
    if seen != total:
        raise TransferkitError(f"the Ray job wrote {seen} rows for {total} inputs; {out} is unchanged")
    ready = rows_dir.with_name("ready")
    ready.mkdir()
    for number, (_, _, _, path) in enumerate(files):
        os.replace(path, ready / f"part-{number:06d}.parquet")
    if out.exists():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(ready, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(ready, out)
