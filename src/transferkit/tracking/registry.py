"""MLflow's model registry: `export --register NAME` publishes the servable artifacts as a model version, and
`serve`/`score` take `models:/NAME/VERSION` or `models:/NAME@ALIAS` where they take a run folder.

What a version holds is what the BentoML model store holds for an export: the artifacts that passed the gate,
their manifest (files with sha256, preprocessing, heads, labels) and verify.json, under `model/export/`, so a
downloaded version is a run folder that serve and score read as they read any other. The gate's verdict for
every format, servable or not, is on the version as tags (`gate.FORMAT`).

A downloaded version is kept in $TRANSFERKIT_CACHE/registry/NAME/VERSION (default ~/.cache/transferkit), its files
checked against the manifest's sha256 every time it is used (`serve` also puts it in the BentoML model store:
cli.py, the one layer that may import export's store).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from pathlib import Path

from transferkit.errors import ConfigError, TransferkitError
from transferkit.manifest import VERIFY_NAME, read_manifest, write_manifest

PREFIX = "models:/"
FOLDER = "model"  # the version's artifact folder in its MLflow run; model/export/ is the run's export folder


def is_registry_uri(text: str | Path) -> bool:
    return str(text).startswith(PREFIX)


def cache_root() -> Path:
    return Path(os.environ.get("TRANSFERKIT_CACHE", Path.home() / ".cache" / "transferkit")) / "registry"


def register_export(tracker, export_dir: Path, name: str) -> str:
    """Log the export's servable files under the tracked run and register them as a new version of `name`
    -> the version number. The gate's verdicts become the version's tags."""
    manifest = read_manifest(export_dir)
    stored = manifest.stored()
    if not stored.servable():
        raise TransferkitError(f"nothing to register: no artifact in {export_dir} passed the gate")
    with tempfile.TemporaryDirectory(prefix="transferkit-register-") as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        for entry in stored.artifacts.values():
            for filename in entry.all_files:
                shutil.copy2(export_dir / filename, folder / filename)
        if (export_dir / VERIFY_NAME).is_file():
            shutil.copy2(export_dir / VERIFY_NAME, folder / VERIFY_NAME)
        write_manifest(folder, dataclasses.replace(stored, bentoml={}))
        tracker.log_artifact(folder, f"{FOLDER}/export")
    client = tracker.client
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    tags = {f"gate.{fmt}": entry.status for fmt, entry in manifest.artifacts.items()}
    tags.update(servable=",".join(stored.servable()), backbone=manifest.backbone, run_dir=str(manifest.run_dir))
    source = f"runs:/{tracker.run_id}/{FOLDER}"
    version = client.create_model_version(name, source, run_id=tracker.run_id, tags=tags)
    return str(version.version)


def parse_registry_uri(text: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` -> (NAME, VERSION, None); `models:/NAME@ALIAS` -> (NAME, None, ALIAS)."""
    rest = text[len(PREFIX) :]
    match = re.fullmatch(r"([^/@]+)(?:/(\d+)|@([A-Za-z0-9_-]+))", rest)
    if not match:
        raise ConfigError(f"{text!r}: use models:/NAME/VERSION or models:/NAME@ALIAS")
    return match.group(1), match.group(2), match.group(3)


def fetch_registered(text: str, tracking_uri: str | None = None) -> Path:
    """A registered version as a local run folder (RUN/export/...), downloaded once and checked every time.
    The tracking server is `tracking_uri`, else $MLFLOW_TRACKING_URI."""
    name, version, alias = parse_registry_uri(text)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"{text}: set MLFLOW_TRACKING_URI to the MLflow server that holds the registry")
    from transferkit.tracking.mlflow_tracker import mlflow_client

    client = mlflow_client(uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as exc:  # noqa: BLE001 - the registry's own message says what is missing
        raise TransferkitError(f"{text}: not in the registry at {uri} ({str(exc).splitlines()[0][:200]})") from None
    local = cache_root() / _safe(name) / str(found.version)
    if not (local / "export" / "manifest.json").is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{found.version}-", dir=local.parent))
        try:
            got = Path(client.download_artifacts(found.run_id, f"{FOLDER}/export", str(partial)))
            (partial / "run").mkdir()
            os.replace(got, partial / "run" / "export")
            shutil.rmtree(local, ignore_errors=True)
            os.replace(partial / "run", local)  # whole or not at all
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    manifest = read_manifest(local / "export")
    manifest.check_files(local / "export")  # what came over the network is what the gate passed
    return local


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
