"""Save an export into the BentoML model store, the standard place a BentoML service loads models from.

    manifest = store_export(export_dir, manifest, run_dir)  # manifest.tag -> "transferkit-mnist-digits:3xk2..."

The stored model holds the servable artifacts, their manifest.json and verify.json; its metadata carries a summary
(backbone, heads, formats) so `bentoml models list/get` says what it is. The store lives in $BENTOML_HOME
(default ~/bentoml). Each export adds a new version under the run's model name.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

from transferkit.manifest import VERIFY_NAME, Manifest, write_manifest

MAX_NAME = 63  # BentoML tag names: lowercase letters, digits, '-', '_', '.'; at most 63 characters


def model_name_for_run(run_dir: str | Path) -> str:
    """`runs/MNIST+digits 2025/` -> `transferkit-mnist-digits-2025`: a valid BentoML model name."""
    base = Path(run_dir).resolve().name.lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._") or "run"
    return f"transferkit-{base}"[:MAX_NAME].rstrip("-._")


def store_export(export_dir: Path, manifest: Manifest, run_dir: str | Path) -> Manifest:
    """Copy the servable files + their manifest into a new BentoML model -> the manifest with the model's tag.

    The stored manifest describes exactly what is stored (`Manifest.stored`: the servable artifacts and their
    files), so everything it lists can be checked and loaded; RUN/export/manifest.json keeps every artifact, the
    failed ones too, with the same tag. The caller writes that copy after this returns, so a failed save never
    records a tag.
    """
    import bentoml

    name = model_name_for_run(run_dir)
    stored = manifest.stored()
    metadata = {
        "transferkit_version": manifest.transferkit_version,
        "backbone": manifest.backbone,
        "image_size": manifest.image_size,
        "heads": {h: len(c) for h, c in manifest.heads.items()},
        "formats": {f: e.status for f, e in manifest.artifacts.items()},
        "servable": stored.servable(),
        "run_dir": manifest.run_dir,
    }
    labels = {"project": "transferkit", "backbone": manifest.backbone, "run": Path(run_dir).resolve().name}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        tagged = {"tag": str(model.tag), "model_name": name}
        target = Path(model.path)
        for entry in stored.artifacts.values():
            for filename in entry.all_files:  # every file (OpenVINO's .bin with its .xml) and its reference
                shutil.copy2(export_dir / filename, target / filename)
        if (export_dir / VERIFY_NAME).is_file():
            shutil.copy2(export_dir / VERIFY_NAME, target / VERIFY_NAME)
        write_manifest(target, dataclasses.replace(stored, bentoml=tagged))
    return dataclasses.replace(manifest, bentoml=tagged)
