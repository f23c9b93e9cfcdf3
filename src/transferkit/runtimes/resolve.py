"""Which stored model and artifact `transferkit serve` and `transferkit build` use for a run: exported, verified,
in the BentoML model store, its files matching their sha256, servable on this machine. Needs no torch and no
process supervision (`build` imports this, not the server).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transferkit.errors import TransferkitError
from transferkit.manifest import read_manifest
from transferkit.runtimes.selection import select_runtime


@dataclass
class ServedModel:
    tag: str  # the BentoML model tag the workers load
    runtime: str = ""  # the artifact that will be served here (what `auto` or a runtime name resolved to)
    because: str = ""  # why that artifact (the measurements it was chosen by)


def stored_model_path(tag: str) -> Path | None:
    """The directory of a stored BentoML model, or None when the store ($BENTOML_HOME) has no such tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(tag).path)
    except NotFound:
        return None


def resolve_served_model(run_dir: str | Path, runtime: str = "auto") -> ServedModel:
    """The run's stored model, checked: exported, verified, in the model store, files intact, servable here."""
    export_dir = Path(run_dir) / "export"
    manifest = read_manifest(export_dir)
    if not manifest.servable():
        statuses = ", ".join(f"{k}: {v.status}" for k, v in manifest.artifacts.items()) or "none"
        raise TransferkitError(
            f"{run_dir}: no exported format passed verification ({statuses}); see {export_dir / 'verify.json'}"
        )
    tag = manifest.tag
    if not tag:
        raise TransferkitError(f"{run_dir}: the export was not saved to the BentoML model store; re-run the export")
    return resolve_stored(tag, runtime, f"transferkit export {run_dir}")


def resolve_stored(tag: str, runtime: str = "auto", how_to_make: str = "transferkit export RUN") -> ServedModel:
    """A stored model, checked: in the model store, files intact, servable here."""
    model_dir = stored_model_path(tag)
    if model_dir is None:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise TransferkitError(
            f"BentoML model {tag} is not in the model store at {home}; re-run `{how_to_make}` "
            "(or set BENTOML_HOME to the store it was exported to)"
        )
    stored = read_manifest(model_dir)  # only what passed verify: Manifest.stored
    stored.check_files(model_dir)  # a corrupt or replaced file fails here, not in every worker
    selected = select_runtime(runtime, stored, model_dir)  # fail here, with the reason, not in the child
    return ServedModel(tag, selected.artifact, selected.selected_because)
