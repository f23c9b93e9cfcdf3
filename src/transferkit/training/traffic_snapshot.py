"""Training on captured traffic (`--unlabeled traffic:DIR`) from a snapshot the run owns.

A capture folder keeps changing under a serving process: new parts arrive and the oldest are deleted to stay
within --capture-max-mb. A run that read it directly would train on one set of images and, resumed (or labelled
again in a later round), on another. So when training starts, the committed parts are linked into the run
(RUN/traffic/<the capture folder's name>/..., hard links: no copy on the same filesystem, and a part the server
later rotates away stays readable), the run's config points at that snapshot, and RUN/traffic.json records where
its images came
from: the capture folder, every part with its row count and sha256, the models and versions that answered, the
time span, and the head that pseudo-labels them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transferkit.config import TrainConfig
from transferkit.data import DatasetSpec
from transferkit.data.captured import check_capture
from transferkit.errors import DataError
from transferkit.utils import atomic_write_json, sha256_file

SNAPSHOT_DIR = "traffic"
RECORD_NAME = "traffic.json"


def _link(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content, whole or not at all (a hard link where possible, else a copy)."""
    if dst.is_file() and dst.stat().st_size == src.stat().st_size:
        return  # already linked (another rank of a distributed run, or a retried start)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _describe(files: list[Path], root: Path) -> dict:
    import pyarrow.parquet as pq

    described, models, versions, times = [], set(), set(), []
    for path in files:
        table = pq.read_table(path, columns=["time", "model", "version"])
        models.update(table.column("model").to_pylist())
        versions.update(table.column("version").to_pylist())
        column = table.column("time")
        if table.num_rows:
            times += [min(column.to_pylist()), max(column.to_pylist())]
        described.append(
            {"file": path.relative_to(root).as_posix(), "rows": table.num_rows, "sha256": sha256_file(path)}
        )
    return {
        "rows": sum(d["rows"] for d in described),
        "models": sorted(models),
        "versions": sorted(versions),
        "first": min(times).isoformat() if times else None,
        "last": max(times).isoformat() if times else None,
        "parts": described,
    }


def snapshot_traffic(config: TrainConfig, run_dir: Path) -> None:
    """Link every `traffic:DIR` of config.unlabeled into the run, point the config at the links, and write
    RUN/traffic.json. Paths in config.unlabeled must already be absolute. A spec already inside the run (a
    resumed run's own snapshot) is left as it is."""
    record, unlabeled = {}, []
    for text in config.unlabeled:
        spec = DatasetSpec.parse(text)
        source = Path(spec.traffic) if spec.traffic is not None else None
        if source is None or source.is_relative_to(run_dir.resolve()):
            unlabeled.append(text)
            continue
        snapshot = run_dir.resolve() / SNAPSHOT_DIR / source.name  # the same folder name: the same dataset name
        files = []
        for part in check_capture(source):
            try:
                _link(part, snapshot / part.relative_to(source))
            except FileNotFoundError:  # rotated away by the server since it was listed
                continue
            files.append(snapshot / part.relative_to(source))
        if not files:
            raise DataError(f"{text}: every captured part was deleted while it was being read; try again")
        record[spec.name] = {
            "source": str(source),
            "snapshot": str(snapshot.relative_to(run_dir.resolve())),
            "head": spec.head,
            **_describe(files, snapshot),
        }
        unlabeled.append(str(DatasetSpec(f"traffic:{snapshot}", spec.head)))
    if record:
        atomic_write_json(run_dir / RECORD_NAME, record)
        config.unlabeled = unlabeled


__all__ = ["RECORD_NAME", "snapshot_traffic"]
