"""Reading manifest.json: the contract between export (which writes it) and serving (which trusts it).

Serving reads preprocessing, labels, outputs and per-format status from here and nowhere else. The writer
is `transferkit.export.manifest`; this half needs no torch, so it ships in the lean serving image.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transferkit.errors import ArtifactMismatchError, TransferkitError
from transferkit.utils import read_json, sha256_file

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
VERIFY_NAME = "verify.json"


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """EXPORT_DIR/manifest.json, or an error that says how to make it."""
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise TransferkitError(
            f"{path} not found: the run has not been exported; run `transferkit export {Path(export_dir).parent}`"
        )
    manifest = read_json(path)
    version = manifest.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise TransferkitError(
            f"{path}: manifest_version {version}, this transferkit reads {MANIFEST_VERSION}; re-run the export"
        )
    return manifest


def servable_formats(manifest: dict[str, Any]) -> list[str]:
    """Formats that passed verify against PyTorch (the only ones serving may load)."""
    return [name for name, f in manifest.get("formats", {}).items() if f.get("servable")]


def verify_files(export_dir: str | Path, manifest: dict[str, Any], names: Iterable[str] | None = None) -> None:
    """Check exported files against the sizes and sha256 recorded in manifest["files"], before any is loaded.

    `names` limits the check to those files. Only files listed in manifest["files"] are checked: exports
    written before a format's file was recorded there simply are not verified. Raises ArtifactMismatchError
    for a missing, truncated, corrupt or replaced file.
    """
    export_dir = Path(export_dir)
    files: dict[str, Any] = manifest.get("files") or {}
    fix = f"re-run `transferkit export {manifest.get('run_dir') or export_dir.parent}`"
    for name in files if names is None else names:
        entry = files.get(name)
        if entry is None:
            continue
        path = export_dir / name
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(expected, str):
            raise ArtifactMismatchError(f"{path}: {MANIFEST_NAME} records no sha256 for it; {fix}")
        if not path.is_file():
            raise ArtifactMismatchError(
                f"{path}: missing, but {MANIFEST_NAME} lists it (expected sha256 {expected}); {fix}"
            )
        size, recorded = path.stat().st_size, entry.get("bytes")
        # size first: a truncated or partly copied file (the common case) is then reported as such
        if recorded is not None and size != recorded:
            raise ArtifactMismatchError(
                f"{path}: size mismatch: expected {recorded} bytes ({MANIFEST_NAME}), actual {size}; "
                f"expected sha256 {expected}, actual {sha256_file(path)}; the file is truncated or was replaced; {fix}"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactMismatchError(
                f"{path}: sha256 mismatch: expected {expected} ({MANIFEST_NAME}), actual {actual}; "
                f"the file is corrupt or was replaced; {fix}"
            )
