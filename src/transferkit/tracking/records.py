"""What `eval` and `export` add to a run's tracked run: their numbers as metrics, their files as artifacts."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from transferkit.tracking import open_tracker
from transferkit.utils import read_json


def metric_key(key: str) -> str:
    """MLflow accepts letters, digits, `_ - . / ` and space in a metric name, up to 250 characters."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]+", "_", key)[:250]


def track_eval(track: str | None, run_dir: Path, eval_path: Path, report_path: Path) -> None:
    if not track:
        return
    tracker = open_tracker(track, run_dir, "eval")
    failed = True
    try:
        numbers = numeric_leaves(read_json(eval_path))
        tracker.log_metrics({metric_key(f"eval/{k}"): v for k, v in numbers.items()})
        for path in (eval_path, report_path, *sorted(report_path.parent.glob("*.png"))):
            tracker.log_artifact(path, "eval")
        failed = False
    finally:
        tracker.finish(failed=failed)


def track_export(track: str | None, run_dir: Path, export_dir: Path, table: str, register: str | None) -> str | None:
    """Log the export (per format: status, measured speed; manifest, verify.json, the table) and, with `register`,
    publish the servable artifacts as a new model version -> that version's number."""
    if not track:
        return None
    from transferkit.manifest import read_manifest

    tracker = open_tracker(track, run_dir, "export")
    failed = True
    try:
        manifest = read_manifest(export_dir)
        tags, speeds = {}, {}
        for name, entry in manifest.artifacts.items():
            tags[f"transferkit.export.{name}"] = entry.status
            for m in entry.measured[-1:]:
                speeds[metric_key(f"export/{name}/images_per_second")] = m.images_per_second
        tracker.set_tags(tags)
        tracker.log_metrics(speeds)
        for name in ("manifest.json", "verify.json"):
            tracker.log_artifact(export_dir / name, "export")
        with tempfile.TemporaryDirectory(prefix="transferkit-track-") as tmp:
            table_path = Path(tmp) / "export_table.txt"  # the table as the command printed it
            table_path.write_text(table + "\n")
            tracker.log_artifact(table_path, "export")
        version = None
        if register:
            from transferkit.tracking.registry import register_export

            version = register_export(tracker, export_dir, register)
        failed = False
        return version
    finally:
        tracker.finish(failed=failed)


def numeric_leaves(values: Any, prefix: str = "") -> dict[str, float]:
    """Every number in a nested report, under a slash-joined key (`val_acc/digits`): what a metric can hold."""
    out: dict[str, float] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            out.update(numeric_leaves(value, f"{prefix}{key}/" if prefix or key else ""))
        return out
    if isinstance(values, bool) or not isinstance(values, (int, float)):
        return out
    if prefix:
        out[prefix.rstrip("/")] = float(values)
    return out
