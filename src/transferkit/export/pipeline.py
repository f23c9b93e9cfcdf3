"""export_run: RUN -> RUN/export/{model.onnx, model-int8.onnx, model.engine, ..., verify.json, manifest.json}
+ BentoML model.

    for each requested artifact, a format at a precision (and the artifacts it is built from):
        not buildable here?  -> "not available here" (with the reason)
        export               -> "export failed" on any error (the message is kept)
        (file written        -> "exported, not verified yet")
        verify vs PyTorch    -> "export ok but verification failed" or "passed"
        passed               -> throughput measured at batch 32 (manifest entry "measured"; `auto` reads it)
    verify.json, then the BentoML model (servable formats only), then manifest.json (with the model tag)

Options are checked before any work. Artifacts not requested this time keep their earlier entries only if their
files are unchanged and were exported from the same model.pt (same sha256); otherwise they are dropped.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.artifact import (
    EXPORT_FAILED,
    EXPORTED,
    FORMAT_SPECS,
    PASSED,
    UNAVAILABLE,
    VERIFY_FAILED,
    check_device,
    artifact_files,
    artifact_name,
    entry_files,
    entry_format,
)
from transferkit.errors import ConfigError
from transferkit.export import verify
from transferkit.export.formats import (
    FORMATS,
    ArtifactRequest,
    ExportFormat,
    ExportJob,
    ExportOptions,
    check_request,
    with_requirements,
)
from transferkit.export.manifest import VERIFY_NAME, base_manifest, file_entry, now_utc, write_manifest
from transferkit.export.table import one_line
from transferkit.serving.manifest import read_manifest, servable_formats
from transferkit.utils import atomic_write_json, read_json


@dataclass
class FormatResult:
    format: str  # the artifact name: the format at its default precision (onnx), else onnx-int8, ...
    status: str  # one of transferkit.artifact.STATUSES
    precision: str
    file: Path | None = None  # the artifact, when the export step succeeded
    error: str | None = None  # why it is not "passed"
    details: dict[str, Any] = field(default_factory=dict)  # exporter details (exporter, opset, GPU, ...)
    verification: dict[str, Any] | None = None  # verify's report (see verify.compare)
    export_seconds: float | None = None
    verify_seconds: float | None = None
    requested: bool = True  # False for an artifact built only because a requested one needs it
    files: list[Path] = field(default_factory=list)  # every file of the artifact (OpenVINO: .xml and .bin)
    measured: dict[str, Any] | None = None  # throughput after verify passed (see _measure)

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
    precision: tuple[str, ...] | list[str] | str = "fp32",
    verify_images: int = 256,
    device: str = "cpu",
    store: bool = True,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Export, verify and store a trained run. Raises ConfigError/DataError before any work on bad input.
    `precision` may list several (`fp32,int8`): every format is exported at each precision it takes."""
    requests = check_request(formats, precision)
    options = options or ExportOptions()
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
    job = ExportJob(module, export_dir, "fp32", device, heads, run.preprocessing.image_size, options=options,
                    calibration=lambda n: verify.load_calibration_images(run, n),
                    gate=_onnx_gate(reference, inputs, heads, options))  # fmt: skip

    results: dict[str, FormatResult] = {}
    for req in with_requirements(requests, device):
        result = _build_one(req, job, results)
        if result.status == EXPORTED:
            result = _verify_one(req.row, result, manifest, export_dir, inputs, reference, options)
        results[req.name] = result
        _record(manifest, req.row, result)

    verify_doc = _verify_document(inputs, results)
    _carry_over(export_dir, manifest, verify_doc, exclude=set(results))
    return _finish(run_dir, export_dir, manifest, verify_doc, results, store)


def _onnx_gate(reference, inputs, heads, options: ExportOptions):
    """(ONNX file, precision) -> verify's report for that file: what the INT8 repair checks each step with."""

    def gate(path: Path, precision: str) -> dict[str, Any]:
        logits = verify.onnx_file_logits(path, inputs.batch, heads)
        return verify.compare(reference, logits, inputs, precision, options.tolerance(FORMATS["onnx"], precision))

    return gate


def _build_one(req: ArtifactRequest, job: ExportJob, done: dict[str, FormatResult]) -> FormatResult:
    row, precision = req.row, req.precision
    reason = row.unavailable(job.device, precision)
    if reason is not None:
        return FormatResult(req.name, UNAVAILABLE, precision, error=reason, requested=req.requested)
    needs = [artifact_name(f, p) for f, p in row.requires(precision)]
    failed_deps = [d for d in needs if d not in done or done[d].file is None]
    if failed_deps:
        return FormatResult(req.name, EXPORT_FAILED, precision, error=f"needs {failed_deps}, which failed",
                            requested=req.requested)  # fmt: skip
    paths = [job.export_dir / f for f in req.files]
    job.precision = precision
    start = time.perf_counter()
    try:
        details = row.export(job, paths[0])
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, not raised
        for path in paths:
            path.unlink(missing_ok=True)  # never leave an earlier export's file looking current
        return FormatResult(req.name, EXPORT_FAILED, precision, error=one_line(exc), requested=req.requested,
                            export_seconds=time.perf_counter() - start)  # fmt: skip
    job.artifacts[req.name] = paths[0]
    return FormatResult(req.name, EXPORTED, precision, file=paths[0], details=details, requested=req.requested,
                        export_seconds=time.perf_counter() - start, files=paths)  # fmt: skip


def _verification_runtime(row: ExportFormat, artifact: str):
    from transferkit.serving.runtime import RUNNERS_BY_FORMAT, OnnxRuntime

    if row.runtime == "onnxruntime":  # verify runs on CPU, fp32 input, like the reference
        return OnnxRuntime(artifact, providers=["CPUExecutionProvider"])
    return RUNNERS_BY_FORMAT[row.name](artifact)


def _verify_one(row, result, manifest, export_dir, inputs, reference, options: ExportOptions) -> FormatResult:
    """Load the artifact through the serving runtime and compare it with the PyTorch reference; if it passes,
    measure its throughput with the same runtime."""
    _record(manifest, row, result)  # the runtime reads file/details from the manifest entry
    start = time.perf_counter()
    runtime = None
    try:
        runtime = _verification_runtime(row, result.format).load(export_dir, manifest)
        logits = verify.runtime_logits(runtime, inputs.batch)
        tolerance = options.tolerance(row, result.precision)
        report = verify.compare(reference, logits, inputs, result.precision, tolerance)
        report["runtime"] = runtime.description
    except Exception as exc:  # noqa: BLE001
        report = {"passed": False, "failures": [f"verification could not run: {one_line(exc)}"]}
    result.verify_seconds = time.perf_counter() - start
    result.verification = report
    result.status = PASSED if report["passed"] else VERIFY_FAILED
    result.error = None if report["passed"] else "; ".join(report["failures"])
    if report["passed"] and runtime is not None:
        entry = manifest["formats"][result.format]
        # verify runs ONNX on the CPU provider whatever the machine has: that is where it was measured
        cpu_only = getattr(runtime, "providers", None) == ["CPUExecutionProvider"]
        result.measured = _measure(runtime, inputs.batch, "cpu" if cpu_only else runtime.device_kind(entry))
    return result


MEASURE_BATCH = 32


def _measure(runtime, batch: np.ndarray, device: str, repeats: int = 7) -> dict[str, Any] | None:
    """Images/s at batch 32 (median of `repeats` calls after warm-up) on the verify images: what `--runtime
    auto` and `transferkit serve` compare artifacts by (`transferkit benchmark` measures more carefully)."""
    x = np.ascontiguousarray(np.resize(batch, (MEASURE_BATCH, *batch.shape[1:])))
    try:
        for _ in range(2):
            runtime.run(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            runtime.run(x)
            times.append(time.perf_counter() - t)
    except Exception:  # noqa: BLE001 - a measurement is optional; the artifact passed verify
        return None
    return {"images_per_second": round(MEASURE_BATCH / statistics.median(times), 1), "batch": MEASURE_BATCH,
            "device": device, "runtime": runtime.description}  # fmt: skip


def _record(manifest: dict[str, Any], row: ExportFormat, result: FormatResult) -> None:
    names = [f.name for f in result.files] or artifact_files(row.name, result.precision)
    manifest["formats"][result.format] = {
        "format": row.name,
        "file": names[0],
        "files": names,
        "runtime": row.runtime,
        "precision": result.precision,
        "status": result.status,
        "servable": result.servable,
        "error": result.error,
        "details": result.details,
        **({"measured": result.measured} if result.measured else {}),
    }
    for path in result.files:
        if path.is_file():
            manifest["files"][path.name] = file_entry(path)
        else:
            manifest["files"].pop(path.name, None)
    if not result.files:
        for name in names:
            manifest["files"].pop(name, None)


def _verify_document(inputs: verify.VerifyInputs, results: dict[str, FormatResult]) -> dict[str, Any]:
    return {
        "created": now_utc(),
        "reference": "PyTorch fp32 eval on CPU, same normalized input",
        "images": inputs.datasets,
        "tolerances": {p: vars(t) for s in FORMAT_SPECS.values() for p, t in s.tolerances.items()},
        "formats": {
            name: {"status": r.status, "error": r.error, **(r.verification or {}),
                   **({"repair": r.details["repair"]} if "repair" in r.details else {})}  # fmt: skip
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
        if name in exclude or entry_format(name, entry) not in FORMATS:
            continue
        files = entry_files(entry)
        recorded = {f: old.get("files", {}).get(f) for f in files}
        if all(recorded.values()) and all((export_dir / f).is_file() and file_entry(export_dir / f) == recorded[f]
                                          for f in files):  # fmt: skip
            manifest["formats"][name] = entry
            manifest["files"].update(recorded)
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
    options = ExportOptions()
    for name, entry in old["formats"].items():
        row, path = FORMATS[entry_format(name, entry)], export_dir / entry["file"]
        files = [export_dir / f for f in entry_files(entry)]
        if not all(f.is_file() for f in files):
            results[name] = FormatResult(name, entry["status"], entry["precision"], error=entry.get("error"))
            _record(manifest, row, results[name])
            continue
        result = FormatResult(name, EXPORTED, entry["precision"], file=path, details=entry.get("details", {}),
                              files=files)  # fmt: skip
        results[name] = _verify_one(row, result, manifest, export_dir, inputs, reference, options)
        _record(manifest, row, results[name])
    unchanged = servable_formats(old) == servable_formats(manifest) and old.get("files") == manifest["files"]
    if unchanged and old.get("bentoml"):
        manifest["bentoml"] = old["bentoml"]
        store = False
    result = _finish(run_dir, export_dir, manifest, _verify_document(inputs, results), results, store)
    if unchanged and old.get("bentoml"):
        result.bentoml_tag = old["bentoml"]["tag"]
    return result

