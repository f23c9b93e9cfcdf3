"""export_run: RUN -> RUN/export/{model.onnx, model.engine, model.pt2, verify.json, manifest.json} + BentoML model.

    for each requested format (and the formats it is built from):
        not buildable here?  -> "not available here" (with the reason)
        export               -> "export failed" on any error (the message is kept)
        (file written        -> "exported, not verified yet")
        verify vs PyTorch    -> "export ok but verification failed" or "passed"
    verify.json, then the BentoML model (servable formats only), then manifest.json (with the model tag)

Options are checked before any work. Formats not requested this time keep their earlier entries only if their
file is unchanged and was exported from the same model.pt (same sha256); otherwise they are dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.artifact import (
    EXPORT_FAILED,
    EXPORTED,
    FORMAT_SPECS,
    PASSED,
    UNAVAILABLE,
    VERIFY_FAILED,
    check_device,
)
from transferkit.errors import ConfigError
from transferkit.export import verify
from transferkit.export.formats import FORMATS, ExportFormat, ExportJob, check_request, with_requirements
from transferkit.export.manifest import VERIFY_NAME, base_manifest, file_entry, now_utc, write_manifest
from transferkit.export.table import one_line
from transferkit.serving.manifest import read_manifest, servable_formats
from transferkit.utils import atomic_write_json, read_json


@dataclass
class FormatResult:
    format: str
    status: str  # one of transferkit.artifact.STATUSES
    precision: str
    file: Path | None = None  # the artifact, when the export step succeeded
    error: str | None = None  # why it is not "passed"
    details: dict[str, Any] = field(default_factory=dict)  # exporter details (exporter, opset, GPU, ...)
    verification: dict[str, Any] | None = None  # verify's report (see verify.compare)
    export_seconds: float | None = None
    verify_seconds: float | None = None
    requested: bool = True  # False for a format built only because a requested one needs it

    @property
    def servable(self) -> bool:
        return self.status == PASSED

    @property
    def bytes(self) -> int | None:
        return self.file.stat().st_size if self.file is not None and self.file.is_file() else None


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
        """Every requested format passed verify (and was stored, when storing was asked for)."""
        requested = [r for r in self.formats.values() if r.requested]
        return bool(requested) and all(r.servable for r in requested) and self.bentoml_error is None


def _check_options(device: str, verify_images: int) -> None:
    check_device(device)
    if verify_images < 1:
        raise ConfigError(f"verify_images must be >= 1 (held-out images per dataset for verify), got {verify_images}")


def export_run(
    run_dir: str | Path,
    formats: tuple[str, ...] | list[str] | str = ("onnx",),
    precision: str = "fp32",
    verify_images: int = 256,
    device: str = "cpu",
    store: bool = True,
) -> ExportResult:
    """Export, verify and store a trained run. Raises ConfigError/DataError before any work on bad input."""
    rows = check_request(formats, precision)
    _check_options(device, verify_images)
    from transferkit.runs import load_run_model  # torch: imported only when exporting
    from transferkit.model import ExportModule

    model, run = load_run_model(run_dir)
    inputs = verify.load_verify_inputs(run, verify_images)  # a missing dataset fails here, before exporting
    export_dir = run.export_dir
    export_dir.mkdir(parents=True, exist_ok=True)
    module = ExportModule(model).eval()
    heads = list(model.head_names)
    reference = verify.pytorch_logits(module, inputs.batch, heads)
    manifest = base_manifest(run, heads)
    job = ExportJob(module, export_dir, precision, device, heads, run.preprocessing.image_size)

    reasons = {row.name: row.unavailable(device) for row in rows}
    buildable = [r for r in rows if reasons[r.name] is None]
    plan = with_requirements(buildable) + [r for r in rows if reasons[r.name] is not None]
    results: dict[str, FormatResult] = {}
    for row in plan:
        requested = row in rows
        row_precision = precision if requested else row.precisions[0]
        result = _build_one(row, job, row_precision, requested, reasons.get(row.name, "unchecked"), results)
        if result.status == EXPORTED:
            result = _verify_one(row, result, manifest, export_dir, inputs, reference)
        results[row.name] = result
        _record(manifest, row, result)

    verify_doc = _verify_document(inputs, results)
    _carry_over(export_dir, manifest, verify_doc, exclude=set(results))
    return _finish(run_dir, export_dir, manifest, verify_doc, results, store)


def _build_one(row: ExportFormat, job: ExportJob, precision: str, requested: bool, reason: str | None,
               done: dict[str, FormatResult]) -> FormatResult:  # fmt: skip
    if reason == "unchecked":  # a dependency added by with_requirements
        reason = row.unavailable(job.device)
    if reason is not None:
        return FormatResult(row.name, UNAVAILABLE, precision, error=reason, requested=requested)
    failed_deps = [d for d in row.requires if d not in done or done[d].file is None]
    if failed_deps:
        return FormatResult(row.name, EXPORT_FAILED, precision, error=f"needs {failed_deps}, which failed",
                            requested=requested)  # fmt: skip
    path = job.export_dir / row.filename
    job.precision = precision
    start = time.perf_counter()
    try:
        details = row.export(job, path)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, not raised
        path.unlink(missing_ok=True)  # never leave an earlier export's file looking current
        return FormatResult(row.name, EXPORT_FAILED, precision, error=one_line(exc), requested=requested,
                            export_seconds=time.perf_counter() - start)  # fmt: skip
    job.artifacts[row.name] = path
    return FormatResult(row.name, EXPORTED, precision, file=path, details=details, requested=requested,
                        export_seconds=time.perf_counter() - start)  # fmt: skip


def _verification_runtime(row: ExportFormat):
    from transferkit.serving.runtime import RUNTIMES, OnnxRuntime

    if row.runtime == "onnxruntime":
        return OnnxRuntime(providers=["CPUExecutionProvider"])  # verify runs on CPU, fp32, like the reference
    return RUNTIMES[row.runtime]()


def _verify_one(row, result, manifest, export_dir, inputs, reference) -> FormatResult:
    """Load the artifact through the serving runtime and compare it with the PyTorch reference."""
    _record(manifest, row, result)  # the runtime reads file/details from the manifest entry
    start = time.perf_counter()
    try:
        runtime = _verification_runtime(row).load(export_dir, manifest)
        logits = verify.runtime_logits(runtime, inputs.batch)
        report = verify.compare(reference, logits, inputs, result.precision, row.tolerances[result.precision])
        report["runtime"] = runtime.description
    except Exception as exc:  # noqa: BLE001
        report = {"passed": False, "failures": [f"verification could not run: {one_line(exc)}"]}
    result.verify_seconds = time.perf_counter() - start
    result.verification = report
    result.status = PASSED if report["passed"] else VERIFY_FAILED
    result.error = None if report["passed"] else "; ".join(report["failures"])
    return result


def _record(manifest: dict[str, Any], row: ExportFormat, result: FormatResult) -> None:
    manifest["formats"][row.name] = {
        "file": row.filename,
        "runtime": row.runtime,
        "precision": result.precision,
        "status": result.status,
        "servable": result.servable,
        "error": result.error,
        "details": result.details,
    }
    if result.file is not None and result.file.is_file():
        manifest["files"][row.filename] = file_entry(result.file)
    else:
        manifest["files"].pop(row.filename, None)


def _verify_document(inputs: verify.VerifyInputs, results: dict[str, FormatResult]) -> dict[str, Any]:
    return {
        "created": now_utc(),
        "reference": "PyTorch fp32 eval on CPU, same normalized input",
        "images": inputs.datasets,
        "tolerances": {p: vars(t) for s in FORMAT_SPECS.values() for p, t in s.tolerances.items()},
        "formats": {
            name: {"status": r.status, "error": r.error, **(r.verification or {})}
            for name, r in results.items()
            if r.verification is not None
        },
    }


def _carry_over(export_dir: Path, manifest: dict, verify_doc: dict, exclude: set[str]) -> None:
    """Keep earlier formats whose file is unchanged and came from the same model.pt."""
    try:
        old = read_manifest(export_dir)
        old_verify = read_json(export_dir / VERIFY_NAME)
    except Exception:  # noqa: BLE001 - no usable earlier export: nothing to keep
        return
    if old.get("source", {}).get("sha256") != manifest["source"]["sha256"]:
        return
    for name, entry in old.get("formats", {}).items():
        if name in exclude or name not in FORMATS:
            continue
        path, recorded = export_dir / entry["file"], old.get("files", {}).get(entry["file"])
        if recorded and path.is_file() and file_entry(path) == recorded:
            manifest["formats"][name] = entry
            manifest["files"][entry["file"]] = recorded
            if name in old_verify.get("formats", {}):
                verify_doc["formats"][name] = old_verify["formats"][name]


def _finish(run_dir, export_dir, manifest, verify_doc, results, store: bool) -> ExportResult:
    atomic_write_json(export_dir / VERIFY_NAME, verify_doc)
    tag, store_error = None, None
    if store and servable_formats(manifest):
        from transferkit.export.store import store_export

        try:
            tag = store_export(export_dir, manifest, run_dir)
        except Exception as exc:  # noqa: BLE001
            manifest["bentoml"] = None
            store_error = f"saving to the BentoML model store failed: {one_line(exc)}"
    write_manifest(export_dir, manifest)
    return ExportResult(Path(run_dir), export_dir, results, tag, store_error)


def verify_export(run_dir: str | Path, verify_images: int = 256, store: bool = True) -> ExportResult:
    """Re-run verify on the artifacts already in RUN/export, against the current model.pt.

    Catches a file changed after export or a model.pt retrained since. Statuses, verify.json and the manifest
    are rewritten; the BentoML model is re-saved when the set of servable files changed.
    """
    _check_options("cpu", verify_images)
    from transferkit.runs import load_run_model
    from transferkit.model import ExportModule

    model, run = load_run_model(run_dir)
    export_dir = run.export_dir
    old = read_manifest(export_dir)
    inputs = verify.load_verify_inputs(run, verify_images)
    heads = list(model.head_names)
    reference = verify.pytorch_logits(ExportModule(model).eval(), inputs.batch, heads)
    manifest = base_manifest(run, heads)
    results: dict[str, FormatResult] = {}
    for name, entry in old["formats"].items():
        row, path = FORMATS[name], export_dir / entry["file"]
        if not path.is_file():
            results[name] = FormatResult(name, entry["status"], entry["precision"], error=entry.get("error"))
            _record(manifest, row, results[name])
            continue
        result = FormatResult(name, EXPORTED, entry["precision"], file=path, details=entry.get("details", {}))
        results[name] = _verify_one(row, result, manifest, export_dir, inputs, reference)
        _record(manifest, row, results[name])
    unchanged = servable_formats(old) == servable_formats(manifest) and old.get("files") == manifest["files"]
    if unchanged and old.get("bentoml"):
        manifest["bentoml"] = old["bentoml"]
        store = False
    result = _finish(run_dir, export_dir, manifest, _verify_document(inputs, results), results, store)
    if unchanged and old.get("bentoml"):
        result.bentoml_tag = old["bentoml"]["tag"]
    return result

