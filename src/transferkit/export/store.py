"""Save an export into the BentoML model store, the standard place a BentoML service loads models from.

    tag = store_export(export_dir, manifest, run_dir)      # -> "transferkit-mnist-digits:3xk2..."

The stored model holds the servable artifacts, manifest.json and verify.json; its metadata carries a summary
(backbone, heads, formats) so `bentoml models list/get` says what it is. The store lives in $BENTOML_HOME
(default ~/bentoml). Each export adds a new version under the run's model name.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from transferkit.artifact import entry_files
from transferkit.serving.manifest import MANIFEST_NAME, VERIFY_NAME, servable_formats

MAX_NAME = 63  # BentoML tag names: lowercase letters, digits, '-', '_', '.'; at most 63 characters


def model_name_for_run(run_dir: str | Path) -> str:
    """`runs/MNIST+digits 2025/` -> `transferkit-mnist-digits-2025`: a valid BentoML model name."""
    base = Path(run_dir).resolve().name.lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._") or "run"
    return f"transferkit-{base}"[:MAX_NAME].rstrip("-._")


def store_export(export_dir: Path, manifest: dict[str, Any], run_dir: str | Path) -> str:
    """Copy the servable files + manifest into a new BentoML model; writes the tag into both manifests.

    The manifest inside the store and RUN/export/manifest.json are identical (both carry the tag). The export
    dir's copy is written by the caller after this returns, so a failed save never records a tag.
    """
    import bentoml

    name = model_name_for_run(run_dir)
    servable = servable_formats(manifest)
    metadata = {
        "transferkit_version": manifest["transferkit_version"],
        "backbone": manifest["backbone"],
        "image_size": manifest["preprocessing"]["image_size"],
        "heads": {h: len(c) for h, c in manifest["heads"].items()},
        "formats": {f: e["status"] for f, e in manifest["formats"].items()},
        "servable": servable,
        "run_dir": manifest["run_dir"],
    }
    labels = {"project": "transferkit", "backbone": manifest["backbone"], "run": Path(run_dir).resolve().name}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        manifest["bentoml"] = {"tag": str(model.tag), "model_name": name}
        target = Path(model.path)
        for fmt in servable:
            for filename in entry_files(manifest["formats"][fmt]):  # every file: OpenVINO's .bin with its .xml
                shutil.copy2(export_dir / filename, target / filename)
        if (export_dir / VERIFY_NAME).is_file():
            shutil.copy2(export_dir / VERIFY_NAME, target / VERIFY_NAME)
        (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return str(model.tag)

