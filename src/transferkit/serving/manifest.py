"""Reading manifest.json: the contract between export (which writes it) and serving (which trusts it).

Serving reads preprocessing, labels, outputs and per-format status from here and nowhere else. The writer
is `transferkit.export.manifest`; this half needs no torch, so it ships in the lean serving image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.utils import read_json

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
    """Formats that passed the accuracy gate (the only ones serving may load)."""
    return [name for name, f in manifest.get("formats", {}).items() if f.get("servable")]
