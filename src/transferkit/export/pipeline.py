"""export_run: RUN -> RUN/export/{model.onnx, model-int8.onnx, model.engine, ..., verify.json, manifest.json}
+ BentoML model.

    for each requested artifact, a format at a precision (and the artifacts it is built from):
        not buildable here?  -> "not available here" (with the reason)
        export               -> "export failed" on any error (the message is kept); INT8 chooses among its
                                attempts on the validation split (export/int8.py)
        (file written        -> "exported, not verified yet")
        verify vs PyTorch    -> "export ok but verification failed" or "passed" (on the test split)
        passed               -> throughput at batch 32 on this machine, with each runtime option the runner
                                offers (OpenVINO: latency / throughput hint); the fastest options are recorded
    verify.json, then the BentoML model (servable artifacts only), then manifest.json (with the model tag)

Options are checked before any work. An artifact exported again replaces its entry. Artifacts not requested this
time keep their earlier entries only if they passed, their files are unchanged, and they were exported from the
same model.pt (same sha256); a failed earlier entry is dropped, so it never lingers in the manifest.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.artifact import (  # noqa: E501
    EXPORT_FAILED,
    EXPORTED,
    FORMAT_SPECS,
    PASSED,
    SLOWER_THAN_FP32,
    UNAVAILABLE,
    VERIFY_FAILED,
    artifact_files,
    artifact_name,
    check_device,
)
from transferkit.errors import ConfigError
from transferkit.export import verify
from transferkit.export.formats import FORMATS, ArtifactRequest, ExportFormat, check_request, with_requirements
from transferkit.export.job import Exported, ExportJob, ExportOptions, Int8Clock, SelectionSet
from transferkit.export.measure import measure_artifact
from transferkit.export.table import one_line
from transferkit.manifest import (
    VERIFY_NAME,
    ArtifactEntry,
    FileRecord,
    Manifest,
    Measurement,
    RuntimeOptions,
    new_manifest,
    now_utc,
    read_manifest,
    write_manifest,
)
from transferkit.utils import atomic_write_json, read_json

if TYPE_CHECKING:
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


def _check_options(device: str, verify_images: int | str) -> int | str:
    from transferkit.serving.runtime import OnnxRuntime

    if missing := OnnxRuntime.missing():
        raise ConfigError(f"export verifies every artifact through ONNX Runtime. {missing}")
    if check_device(device) == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: torch finds no CUDA device on this machine; export with "
                "--device cpu, or on a machine with the GPU that will serve"
            )
    return verify.parse_verify_images(verify_images)


def _images_per_dataset(verify_images: int | str, run) -> int:
    if verify_images != verify.AUTO:
        return int(verify_images)
    return verify.auto_verify_images(run.preprocessing.image_size, len(run.labels.datasets))


def export_run(
    run_dir: str | Path,
    formats: tuple[str, ...] | list[str] | str = ("onnx",),
    precision: tuple[str, ...] | list[str] | str = "fp32",
    verify_images: int | str = verify.AUTO,
    device: str = "cpu",
    store: bool = True,
    options: ExportOptions | None = None,
    data: list[str] | None = None,
) -> ExportResult:
    """Export, verify and store a trained run. Raises ConfigError/DataError before any work on bad input.
    `precision` may list several (`fp32,int8`): every format is exported at each precision it takes."""
    requests = check_request(formats, precision)
    options = options or ExportOptions()
    verify_images = _check_options(device, verify_images)
    from transferkit.export.verify_corrupted import corrupted_sample
    from transferkit.model import ExportModule
    from transferkit.runs import load_run_model  # torch: imported only when exporting

    model, run = load_run_model(run_dir)
    run = verify.with_data(run, data)  # `--data`: the run's datasets where they are on this machine
    module = ExportModule(model).eval()
    verify_images = _images_per_dataset(verify_images, run)
    inputs = verify.load_verify_inputs(run, verify_images)  # a missing dataset fails here, before exporting
    export_dir = run.export_dir
    export_dir.mkdir(parents=True, exist_ok=True)
    heads = list(model.head_names)
    reference = verify.pytorch_logits(module, inputs.batch, heads)
    sample = corrupted_sample(inputs, run.preprocessing, module, heads)  # the gate's corrupted images too
    manifest = new_manifest(run, heads)
    plan = with_requirements(requests, device)
    selection = None
    if any(r.precision == "int8" for r in plan):  # INT8 chooses among its attempts on the validation split
        val = verify.load_verify_inputs(run, verify_images, split="val")
        selection = SelectionSet(
            val, verify.pytorch_logits(module, val.batch, heads), options.tolerance(FORMATS["onnx"], "int8")
        )
    job = ExportJob(
        module,
        export_dir,
        "fp32",
        device,
        heads,
        run.preprocessing.image_size,
        options=options,
        calibration=lambda n: verify.load_calibration_images(run, n),
        selection=selection,
        qat=_quantization_aware(run, model, options) if selection is not None else None,
        int8_clock=Int8Clock(options.int8_budget_s),
    )

    results: dict[str, FormatResult] = {}
    for req in plan:
        result = _build_one(req, job, results)
        if result.status == EXPORTED:
            result = _verify_one(req.row, result, manifest, export_dir, inputs, reference, options, device, sample)
            if options.slower_int8 == "withhold":
                _withhold_if_slower(result, results.get(artifact_name(req.row.name, "fp32")))
        results[req.name] = result
        manifest = _record(manifest, req.row, result)

    verify_doc = _verify_document(inputs, results, sample)
    manifest = _carry_over(export_dir, manifest, verify_doc, exclude=set(results))
    return _finish(run_dir, export_dir, manifest, verify_doc, results, store)


def _quantization_aware(run, model, options: ExportOptions):
    """The export's quantization-aware fine-tuning: trained only if a search reaches it (with --qat off, none
    does, and the attempts say so)."""
    from transferkit.export.qat import QuantizationAware

    return QuantizationAware(run, model, list(verify.dataset_sources(run).values()), options.qat_steps)


def _build_one(req: ArtifactRequest, job: ExportJob, done: dict[str, FormatResult]) -> FormatResult:
    row, precision = req.row, req.precision
    reason = row.unavailable(job.device, precision)
    if reason is not None:
        return FormatResult(req.name, UNAVAILABLE, precision, error=reason, requested=req.requested)
    needs = [artifact_name(f, p) for f, p in row.requires(precision)]
    failed_deps = [d for d in needs if d not in done or done[d].file is None]
    if failed_deps:
        return FormatResult(
            req.name, EXPORT_FAILED, precision, error=f"needs {failed_deps}, which failed", requested=req.requested
        )
    paths = [job.export_dir / f for f in req.files]
    job.precision = precision
    start = time.perf_counter()
    try:
        exported = row.export(job, paths[0])
    except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, not raised
        for path in paths:
            path.unlink(missing_ok=True)  # never leave an earlier export's file looking current
        return FormatResult(
            req.name,
            EXPORT_FAILED,
            precision,
            error=one_line(exc),
            requested=req.requested,
            export_seconds=time.perf_counter() - start,
        )
    job.artifacts[req.name] = paths[0]
    return FormatResult(
        req.name,
        EXPORTED,
        precision,
        file=paths[0],
        exported=exported,
        requested=req.requested,
        export_seconds=time.perf_counter() - start,
        files=paths,
    )


def _onnx_verified_on_gpu(row: ExportFormat, precision: str, device: str) -> bool:
    """ONNX is checked on the provider that will serve it: CUDA for a GPU export or a precision served on a GPU
    only (fp16), where onnxruntime-gpu has it; the CPU otherwise (the verification then says so)."""
    from transferkit.serving.runtime import OnnxRuntime

    wants_gpu = device != "cpu" or precision in FORMAT_SPECS[row.name].gpu_only_precisions
    return wants_gpu and OnnxRuntime.gpu_available()


def _withhold_if_slower(result: FormatResult, fp32: FormatResult | None) -> None:
    """An INT8 artifact that passed the gate but runs slower than its own format's fp32, both measured here in
    this export, is not offered: serving it would trade accuracy for nothing (`--slower-int8 offer` keeps it
    servable, for its size). Its file and numbers stay."""
    if result.status != PASSED or result.precision != "int8" or not result.measured:
        return
    if fp32 is None or fp32.status != PASSED or not fp32.measured:
        return
    ratio = result.measured.images_per_second / fp32.measured.images_per_second
    if ratio < 1.0:
        result.status = SLOWER_THAN_FP32
        result.error = (
            f"passed the gate but runs at {ratio:.2f}x of {fp32.format} on this machine "
            f"({result.measured.images_per_second:,.0f} vs {fp32.measured.images_per_second:,.0f} img/s "
            f"at batch {result.measured.batch}): not offered; serve {fp32.format}"
        )


def _verification_runtime(row: ExportFormat, artifact: str, precision: str, device: str):
    from transferkit.serving.runtime import RUNNERS_BY_FORMAT, OnnxRuntime

    if row.runtime == "onnxruntime":  # fp32 input, like the reference
        on_gpu = _onnx_verified_on_gpu(row, precision, device)
        return OnnxRuntime(artifact, providers=[OnnxRuntime.GPU_PROVIDER] * on_gpu + ["CPUExecutionProvider"])
    return RUNNERS_BY_FORMAT[row.name](artifact)


def _verify_one(
    row,
    result,
    manifest: Manifest,
    export_dir,
    inputs,
    reference,
    options: ExportOptions,
    device: str = "cpu",
    sample: CorruptedSample | None = None,
) -> FormatResult:
    """Load the artifact through the serving runtime and compare it with the PyTorch reference, on the test images
    and on `sample`, their corrupted copies; if it passes, measure its throughput with the same runtime, under each
    runtime option it offers."""
    manifest = _record(manifest, row, result)  # the runtime reads files and serving fields from the entry
    start = time.perf_counter()
    runtime = None
    try:
        # the bytes verified are the bytes hashed: read once, checked against the record just made, loaded from
        # memory, and that record is the one the manifest keeps (_record)
        verified = manifest.read_verified(export_dir, [f.name for f in result.files])
        result.records = {name: manifest.files[name] for name in verified}
        runtime = _verification_runtime(row, result.format, result.precision, device).load(
            export_dir, manifest, verified
        )
        del verified
        logits = verify.runtime_logits(runtime, inputs.batch)
        tolerance = options.tolerance(row, result.precision)
        report = verify.compare(reference, logits, inputs, result.precision, tolerance)
        report["runtime"] = runtime.description
        if sample is not None:
            sample.check(report, runtime, options.robust_tolerance)
        if result.precision in FORMAT_SPECS[row.name].gpu_only_precisions and "CUDA" not in runtime.description:
            report["note"] = "verified on the CPU; served on a GPU only"
    except Exception as exc:  # noqa: BLE001
        report = {"passed": False, "failures": [f"verification could not run: {one_line(exc)}"]}
    result.verify_seconds = time.perf_counter() - start
    result.verification = report
    result.status = PASSED if report["passed"] else VERIFY_FAILED
    result.error = None if report["passed"] else "; ".join(report["failures"])
    if report["passed"] and runtime is not None:
        fresh = lambda: _verification_runtime(row, result.format, result.precision, device)  # noqa: E731
        result.measured, result.tuning = measure_artifact(fresh, runtime, export_dir, manifest, inputs.batch)
    return result


def _entry(row: ExportFormat, result: FormatResult) -> ArtifactEntry:
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
    )


def _record(manifest: Manifest, row: ExportFormat, result: FormatResult) -> Manifest:
    entry = _entry(row, result)
    records: dict[str, FileRecord | None] = {}
    for path in result.files:
        records[path.name] = result.records.get(path.name) or (FileRecord.of(path) if path.is_file() else None)
    if not result.files:
        records.update({name: None for name in entry.files})
    return manifest.with_artifact(entry, records)


def _verify_document(
    inputs: verify.VerifyInputs, results: dict[str, FormatResult], sample: CorruptedSample | None = None
) -> dict[str, Any]:
    from transferkit.artifact import FORMAT_SPECS

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


def _carry_over(export_dir: Path, manifest: Manifest, verify_doc: dict, exclude: set[str]) -> Manifest:
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
        recorded = {f: old.files.get(f) for f in entry.files}
        if all(recorded.values()) and all(
            (export_dir / f).is_file() and FileRecord.of(export_dir / f) == recorded[f] for f in entry.files
        ):
            manifest = manifest.with_artifact(entry, recorded)
            if name in old_verify.get("formats", {}):
                verify_doc["formats"][name] = old_verify["formats"][name]
    return manifest


def _finish(run_dir, export_dir, manifest: Manifest, verify_doc, results, store: bool) -> ExportResult:
    atomic_write_json(export_dir / VERIFY_NAME, verify_doc)
    tag, store_error = None, None
    manifest = dataclasses.replace(manifest, bentoml=None)
    if store and manifest.servable():
        from transferkit.export.store import store_export

        try:
            manifest = store_export(export_dir, manifest, run_dir)
            tag = manifest.tag
        except Exception as exc:  # noqa: BLE001
            store_error = f"saving to the BentoML model store failed: {one_line(exc)}"
    write_manifest(export_dir, manifest)
    return ExportResult(Path(run_dir), export_dir, results, tag, store_error)


def verify_export(run_dir: str | Path, verify_images: int | str = verify.AUTO, store: bool = True) -> ExportResult:
    """Re-run verify on the artifacts already in RUN/export, against the current model.pt.

    Catches a file changed after export or a model.pt retrained since. Statuses, verify.json and the manifest
    are rewritten; the BentoML model is re-saved when the set of servable files changed.
    """
    verify_images = _check_options("cpu", verify_images)
    from transferkit.export.verify_corrupted import corrupted_sample
    from transferkit.model import ExportModule
    from transferkit.runs import load_run_model

    model, run = load_run_model(run_dir)
    export_dir = run.export_dir
    old = read_manifest(export_dir)
    heads = list(model.head_names)
    module = ExportModule(model).eval()
    inputs = verify.load_verify_inputs(run, _images_per_dataset(verify_images, run))
    reference = verify.pytorch_logits(module, inputs.batch, heads)
    sample = corrupted_sample(inputs, run.preprocessing, module, heads)
    manifest = new_manifest(run, heads)
    results: dict[str, FormatResult] = {}
    options = ExportOptions()
    for name, entry in old.artifacts.items():
        row = FORMATS[entry.format]
        files = [export_dir / f for f in entry.files]
        exported = Exported(entry.details, entry.batch_range, entry.device, entry.built_for_gpu)
        if not all(f.is_file() for f in files):
            results[name] = FormatResult(name, entry.status, entry.precision, error=entry.error, exported=exported)
            manifest = _record(manifest, row, results[name])
            continue
        result = FormatResult(name, EXPORTED, entry.precision, file=files[0], exported=exported, files=files)
        results[name] = _verify_one(
            row, result, manifest, export_dir, inputs, reference, options, entry.device or "cpu", sample
        )
        _withhold_if_slower(results[name], results.get(artifact_name(row.name, "fp32")))
        manifest = _record(manifest, row, results[name])
    unchanged = old.servable() == manifest.servable() and old.files == manifest.files
    if unchanged and old.bentoml:
        manifest = dataclasses.replace(manifest, bentoml=old.bentoml)
        atomic_write_json(export_dir / VERIFY_NAME, _verify_document(inputs, results, sample))
        write_manifest(export_dir, manifest)
        return ExportResult(Path(run_dir), export_dir, results, old.tag)
    return _finish(run_dir, export_dir, manifest, _verify_document(inputs, results, sample), results, store)
