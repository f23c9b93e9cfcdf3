"""Predictions written so that no work is lost: in parts, each committed atomically, resumed after a kill.

While a job runs, its rows go to PREDS.parts/part-NNNNNN.parquet, each part written to a temporary file,
flushed to disk and renamed into place (a rename is atomic: a part is whole or absent). PREDS.parts/job.json
holds what the rows depend on (the model's artifact and its sha256, the inputs, top-k, the part size). The same
command after a crash or kill -9 finds the committed parts, skips that many inputs and goes on; with other
options it is refused rather than mixing two jobs' rows. At the end the parts are joined, in order, into PREDS
(Parquet, CSV or JSON lines by suffix) through a temporary file and one rename, and PREDS.parts is removed.

Columns: `path`; per head `<head>_labels` and `<head>_scores` (the top-k, best first) and, for imagefolder
inputs, `<head>_true`; `error` (the message, empty when scored) and `error_kind`. In CSV the label and score
lists are JSON arrays.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from transferkit.errors import ConfigError
from transferkit.utils import atomic_write, csv_cell

OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")
JOB_FILE = "job.json"


def schema(heads: list[str], with_truth: bool) -> pa.Schema:
    fields = [pa.field("path", pa.string())]
    for head in heads:
        fields += [
            pa.field(f"{head}_labels", pa.list_(pa.string())),
            pa.field(f"{head}_scores", pa.list_(pa.float64())),
        ]
        if with_truth:
            fields.append(pa.field(f"{head}_true", pa.string()))
    return pa.schema(fields + [pa.field("error", pa.string()), pa.field("error_kind", pa.string())])


def check_output(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out {out}: the suffix picks the format; use {', '.join(OUTPUT_SUFFIXES)}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name such as {out / 'predictions.parquet'}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    return out


class PartWriter:
    def __init__(self, out: Path, table_schema: pa.Schema, job: dict[str, Any]) -> None:
        self.out = out
        self.schema = table_schema
        self.parts_dir = out.with_name(out.name + ".parts")
        self.job = job
        self.committed = self._resume()

    def _resume(self) -> list[Path]:
        """The parts of an interrupted run of this same job, in order (none for a new job)."""
        job_file = self.parts_dir / JOB_FILE
        if not job_file.is_file():
            shutil.rmtree(self.parts_dir, ignore_errors=True)  # a folder left before its job file was written
            self.parts_dir.mkdir()
            atomic_write(job_file, lambda tmp: tmp.write_text(json.dumps(self.job, indent=2, sort_keys=True)))
            return []
        before = json.loads(job_file.read_text())
        if before != self.job:
            changed = sorted(k for k in set(before) | set(self.job) if before.get(k) != self.job.get(k))
            raise ConfigError(
                f"{self.parts_dir} holds an unfinished job with other {', '.join(changed)}; run the same "
                f"command again to resume it, or delete {self.parts_dir} to start over"
            )
        return sorted(self.parts_dir.glob("part-*.parquet"))

    @property
    def rows_done(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.committed)

    def commit(self, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows, schema=self.schema)
        path = self.parts_dir / f"part-{len(self.committed):06d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        self.committed.append(path)

    def tables(self) -> Iterator[pa.Table]:
        for part in self.committed:
            yield pq.read_table(part, schema=self.schema)

    def finish(self) -> None:
        """Join the parts into the output in its format, atomically; then the parts go."""
        suffix = self.out.suffix.lower()

        def write(tmp: Path) -> None:
            if suffix == ".parquet":
                with pq.ParquetWriter(tmp, self.schema) as writer:
                    for table in self.tables():
                        writer.write_table(table)
                return
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                if suffix == ".csv":
                    _write_csv_header(f, self.schema.names)
                for table in self.tables():
                    (_write_csv if suffix == ".csv" else _write_jsonl)(f, table)

        atomic_write(self.out, write)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def _write_jsonl(f, table: pa.Table) -> None:
    for row in table.to_pylist():
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_csv_header(f, names: list[str]) -> None:
    csv.writer(f).writerow(names)


def _write_csv(f, table: pa.Table) -> None:
    writer = csv.writer(f)
    names = table.schema.names
    for row in table.to_pylist():
        writer.writerow(
            [
                json.dumps(v, ensure_ascii=False) if isinstance(v, list) else ("" if v is None else csv_cell(v))
                for v in (row[n] for n in names)
            ]
        )
