"""What an export produced and how it is written down: each artifact's result (FormatResult), the export's
(ExportResult), its manifest entry, verify.json, and the earlier artifacts an export keeps (`carry_over`).
export/pipeline.py makes the results; serving reads what these write (transferkit.manifest)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.artifact import FORMAT_SPECS, PASSED, SLOWER_THAN_FP32, artifact_files
from transferkit.export.formats import FORMATS, ExportFormat
from transferkit.export.job import Exported
from transferkit.manifest import (
    VERIFY_NAME,
    ArtifactEntry,
    FileRecord,
    Manifest,
    Measurement,
    RuntimeOptions,
    now_utc,
    read_manifest,
)
from transferkit.utils import read_json

if TYPE_CHECKING:
    from transferkit.export.verify import VerifyInputs
    from transferkit.export.verify_corrupted import CorruptedSample


@dataclass
class FormatResult:
    format: str  # the artifact name: the format at its default precision (onnx), else onnx-int8, ...
    status: str  # one of transferkit.artifact.STATUSES
    precision: str
    file: Path | None = None  # the artifact, when the export step succeeded
    error: str | None = None  # why it is not "passed"
    exported: Exported = field(default_factory=lambda: Exported({}))  # the exporter's report
    verification: dict[str, Any] | None = None  # verify's report (see verify.compare)
    export_seconds: float | None = None
    verify_seconds: float | None = None
    requested: bool = True  # False for an artifact built only because a requested one needs it
    files: list[Path] = field(default_factory=list)  # every file of the artifact (OpenVINO: .xml and .bin)
    measured: Measurement | None = None  # throughput after verify passed, with the fastest runtime options
    tuning: list[dict[str, Any]] = field(default_factory=list)  # every runtime option measured
    records: dict[str, FileRecord] = field(default_factory=dict)  # each file's size and sha256 as verified
    reference: str | None = None  # drift's reference, written when it passed (drift_reference.py)

    @property
    def details(self) -> dict[str, Any]:
        return self.exported.details

    @property
    def servable(self) -> bool:
        return self.status == PASSED

    @property
    def bytes(self) -> int | None:
        sizes = [f.stat().st_size for f in self.files or ([self.file] if self.file else []) if f.is_file()]
        return sum(sizes) if sizes else None


@dataclass
class ExportResult:
    run_dir: Path
    export_dir: Path
    formats: dict[str, FormatResult]  # in the order they were built
    bentoml_tag: str | None
    bentoml_error: str | None = None

    @property
    def manifest_path(self) -> Path:
        return self.export_dir / "manifest.json"

    @property
    def verify_path(self) -> Path:
        return self.export_dir / VERIFY_NAME

    @property
    def ok(self) -> bool:
        """Every requested format passed verify (and was stored, when storing was asked for). An INT8 artifact
        that passed but is withheld for being slower than fp32 here is no failure: the export did what it could."""
        requested = [r for r in self.formats.values() if r.requested]
        passed = all(r.servable or r.status == SLOWER_THAN_FP32 for r in requested)
        return bool(requested) and passed and self.bentoml_error is None


def manifest_entry(row: ExportFormat, result: FormatResult) -> ArtifactEntry:
    names = [f.name for f in result.files] or artifact_files(row.name, result.precision)
    exported = result.exported
    details = dict(exported.details)
    if result.tuning:
        details["runtime_options_measured"] = result.tuning
    return ArtifactEntry(
        name=result.format,
        format=row.name,
        precision=result.precision,
        runtime=row.runtime,
        files=tuple(names),
        status=result.status,
        error=result.error,
        batch_range=exported.batch_range,
        device=exported.device,
        built_for_gpu=exported.built_for_gpu,
        runtime_options=result.measured.runtime_options if result.measured else RuntimeOptions(),
        measured=(result.measured,) if result.measured else (),
        details=details,
        reference=result.reference if result.servable else None,
    )


def record_result(manifest: Manifest, row: ExportFormat, result: FormatResult) -> Manifest:
    entry = manifest_entry(row, result)
    records: dict[str, FileRecord | None] = {}
    for path in result.files:
        records[path.name] = result.records.get(path.name) or (FileRecord.of(path) if path.is_file() else None)
    if result.reference:  # recorded while it serves; forgotten when the artifact was withheld after all
        records[result.reference] = result.records[result.reference] if result.servable else None
    if not result.files:
        records.update({name: None for name in entry.files})
    return manifest.with_artifact(entry, records)


def verify_document(
    inputs: VerifyInputs, results: dict[str, FormatResult], sample: CorruptedSample | None = None
) -> dict[str, Any]:
    def extra(r: FormatResult) -> dict[str, Any]:  # INT8: every attempt, what was chosen, which split did what
        return {k: r.details[k] for k in ("quantization", "splits", "attempts", "fp32_layers") if k in r.details}

    return {
        "created": now_utc(),
        "reference": "PyTorch fp32 eval on CPU, same normalized input",
        "images": inputs.datasets,
        "robustness_sample": sample.describe() if sample is not None else None,
        "tolerances": {p: vars(t) for s in FORMAT_SPECS.values() for p, t in s.tolerances.items()},
        "formats": {
            name: {"status": r.status, "error": r.error, **(r.verification or {}), **extra(r)}
            for name, r in results.items()
            if r.verification is not None
        },
    }


def carry_over(export_dir: Path, manifest: Manifest, verify_doc: dict, exclude: set[str]) -> Manifest:
    """Keep earlier artifacts that passed, whose files are unchanged and came from the same model.pt."""
    try:
        old = read_manifest(export_dir)
        old_verify = read_json(export_dir / VERIFY_NAME)
    except Exception:  # noqa: BLE001 - no usable earlier export: nothing to keep
        return manifest
    if old.source.get("sha256") != manifest.source["sha256"]:
        return manifest
    for name, entry in old.artifacts.items():
        if name in exclude or entry.format not in FORMATS or not entry.servable:
            continue
        recorded = {f: old.files.get(f) for f in entry.all_files}
        if all(recorded.values()) and all(
            (export_dir / f).is_file() and FileRecord.of(export_dir / f) == recorded[f] for f in entry.all_files
        ):
            manifest = manifest.with_artifact(entry, recorded)
            if name in old_verify.get("formats", {}):
                verify_doc["formats"][name] = old_verify["formats"][name]
    return manifest
