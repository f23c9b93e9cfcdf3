"""What `transferkit score --input SRC...` reads: every SRC turned into image paths, in a fixed order.

    a folder              every file below it with a suffix the server decodes (.jpg .jpeg .png .webp), hidden
                          files and folders left out: a folder's own files (sorted), then each sub-folder's
    a glob                `photos/**/*.jpg` (quote it), matches sorted
    a list file           .txt (one path per line), .csv or .parquet (a `path` column); a relative path is
                          relative to the list file's folder
    imagefolder:PATH      PATH/<class>/<image> (or PATH/test/<class>/... when PATH has a test split): the
                          class folder is the true label, scored for every head whose labels include it

The order is the same on every call (the resume of an interrupted job skips what is already committed by
position), and paths stream: a folder of millions of files is never held as a list. Everything is checked
before any image is scored: a missing SRC, a list without a `path` column or an imagefolder whose classes no
head knows is refused with the fix.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import ConfigError
from transferkit.preprocess import SERVED_SUFFIXES
from transferkit.utils import walk_files

SCORED_SUFFIXES = SERVED_SUFFIXES  # what /predict decodes
LIST_SUFFIXES = (".txt", ".csv", ".parquet")
IMAGEFOLDER = "imagefolder:"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Item:
    path: str
    truth: dict[str, str] | None = None  # head -> true label (imagefolder inputs)


@dataclass(frozen=True)
class Source:
    spec: str
    kind: str  # folder | glob | txt | csv | parquet | imagefolder
    root: Path
    truth_heads: tuple[str, ...] = ()  # imagefolder: the heads scored against the class folders

    def items(self) -> Iterator[Item]:
        if self.kind == "folder":
            yield from (Item(p) for p in walk_files(self.root, SCORED_SUFFIXES))
        elif self.kind == "glob":
            yield from (Item(p) for p in sorted(glob.glob(self.spec, recursive=True)) if os.path.isfile(p))
        elif self.kind == "imagefolder":
            for class_dir in _class_dirs(self.root):
                truth = {head: class_dir.name for head in self.truth_heads}
                yield from (Item(p, truth) for p in walk_files(class_dir, SCORED_SUFFIXES))
        else:
            base = self.root.parent
            for raw in _list_paths(self.root, self.kind):
                yield Item(raw if os.path.isabs(raw) else str(base / raw))

    def count(self) -> int:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.root).metadata.num_rows
        return sum(1 for _ in self.items())


def open_sources(specs: list[str], heads: dict[str, list[str]]) -> list[Source]:
    """SRC strings -> checked Sources, or a ConfigError naming the bad one and the fix."""
    if not specs:
        raise ConfigError(
            "no inputs; give --input with a folder, a glob, a .txt/.csv/.parquet list or imagefolder:PATH"
        )
    return [_open(spec, heads) for spec in specs]


def iter_items(sources: list[Source]) -> Iterator[Item]:
    for source in sources:
        yield from source.items()


def _open(spec: str, heads: dict[str, list[str]]) -> Source:
    if spec.startswith(IMAGEFOLDER):
        return _imagefolder(spec, Path(spec[len(IMAGEFOLDER) :]).expanduser(), heads)
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, "folder", path)
    if path.is_file():
        kind = path.suffix.lower().lstrip(".")
        if f".{kind}" not in LIST_SUFFIXES:
            raise ConfigError(
                f"input {spec}: a single file is read as a list of paths, and {path.suffix or 'no suffix'} "
                f"is not a list format ({', '.join(LIST_SUFFIXES)}); to score images, give their folder "
                "or a glob"
            )
        _check_list(path, kind)
        return Source(spec, kind, path)
    if _GLOB_CHARS & set(spec):
        return Source(spec, "glob", path)
    raise ConfigError(
        f"input {spec}: no such file or folder; give a folder, a glob, a .txt/.csv/.parquet list or imagefolder:PATH"
    )


def _imagefolder(spec: str, root: Path, heads: dict[str, list[str]]) -> Source:
    if not root.is_dir():
        raise ConfigError(f"input {spec}: {root} is not a folder; imagefolder:PATH needs PATH/<class>/<image>")
    if (root / "test").is_dir():
        root = root / "test"
    classes = [d.name for d in _class_dirs(root)]
    if not classes:
        raise ConfigError(f"input {spec}: {root} has no class folders; imagefolder:PATH needs PATH/<class>/<image>")
    matching = tuple(h for h, labels in heads.items() if set(classes) <= set(labels))
    if not matching:
        known = "; ".join(
            f"{h}: {', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''}" for h, labels in heads.items()
        )
        raise ConfigError(
            f"input {spec}: no head of this model has all of its classes ({', '.join(classes[:6])}"
            f"{', ...' if len(classes) > 6 else ''}); the heads' labels: {known}. Rename the class "
            "folders, or give the plain folder to score without accuracy"
        )
    return Source(spec, "imagefolder", root, matching)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_list(path: Path, kind: str) -> None:
    if kind == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if "path" not in header:
            raise ConfigError(
                f"input {path}: the CSV has no `path` column (its columns: {', '.join(header) or 'none'})"
            )
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
            raise ConfigError(f"input {path}: not a readable Parquet file ({exc})") from None
        if "path" not in names:
            raise ConfigError(f"input {path}: the Parquet file has no `path` column (its columns: {', '.join(names)})")


def _list_paths(path: Path, kind: str) -> Iterator[str]:
    if kind == "txt":
        with open(path, encoding="utf-8") as f:
            yield from (line.strip() for line in f if line.strip() and not line.startswith("#"))
    elif kind == "csv":
        with open(path, newline="", encoding="utf-8") as f:
            yield from (row["path"] for row in csv.DictReader(f) if row.get("path"))
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=["path"], batch_size=65536):
            yield from (p for p in batch.column(0).to_pylist() if p)
