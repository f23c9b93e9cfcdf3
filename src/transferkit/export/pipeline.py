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
from pathlib import Path
from typing import TYPE_CHECKING

from transferkit.artifact import (  # noqa: E501
    EXPORT_FAILED,
    EXPORTED,
    FORMAT_SPECS,
    PASSED,
    SLOWER_THAN_FP32,
    UNAVAILABLE,
    VERIFY_FAILED,
    artifact_name,
    check_device,
)
from transferkit.drift_reference import reference_name, write_reference
from transferkit.errors import ConfigError, one_line
from transferkit.export import verify
from transferkit.export.formats import FORMATS, ArtifactRequest, ExportFormat, check_request, with_requirements
from transferkit.export.job import Exported, ExportJob, ExportOptions, Int8Clock, SelectionSet
from transferkit.export.measure import measure_artifact
from transferkit.export.results import ExportResult, FormatResult, carry_over, record_result, verify_document
from transferkit.manifest import (
    VERIFY_NAME,
    Manifest,
    new_manifest,
    read_manifest,
    write_manifest,
)
from transferkit.utils import atomic_write_json

if TYPE_CHECKING:
    from transferkit.export.verify_corrupted import CorruptedSample


def _check_options(device: str, verify_images: int | str) -> int | str:
    from transferkit.runtimes.runtime import OnnxRuntime

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
    loaded: dict = {}  # each dataset loaded once for the test, validation and calibration images
    inputs = verify.load_verify_inputs(run, verify_images, loaded=loaded)  # a missing dataset fails here
    export_dir = run.export_dir
    export_dir.mkdir(parents=True, exist_ok=True)
    heads = list(model.head_names)
    reference = verify.pytorch_logits(module, inputs.batch, heads)
    sample = corrupted_sample(inputs, run.preprocessing, module, heads)  # the gate's corrupted images too
    manifest = new_manifest(run, heads)
    plan = with_requirements(requests, device)
    selection = None
    if any(r.precision == "int8" for r in plan):  # INT8 chooses among its attempts on the validation split
        val = verify.load_verify_inputs(run, verify_images, split="val", loaded=loaded)
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
        calibration=lambda n: verify.load_calibration_images(run, n, loaded),
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
        manifest = record_result(manifest, req.row, result)

    verify_doc = verify_document(inputs, results, sample)
    manifest = carry_over(export_dir, manifest, verify_doc, exclude=set(results))
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
    from transferkit.runtimes.runtime import OnnxRuntime

    wants_gpu = device != "cpu" or precision in FORMAT_SPECS[row.name].gpu_only_precisions
    return wants_gpu and OnnxRuntime.gpu_available()


def _withhold_if_slower(result: FormatResult, fp32: FormatResult | None) -> None:
    """An INT8 artifact that passed the gate but runs slower than its own format's fp32, both measured here in
    this export, is not offered: serving it would trade accuracy for nothing (`--slower-int8 offer` keeps it
    servable, for its size). Its file and numbers stay; its drift reference, only for what serves, goes."""
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
        if result.reference and result.file is not None:
            (result.file.parent / result.reference).unlink(missing_ok=True)
            result.reference = None


def _verification_runtime(row: ExportFormat, artifact: str, precision: str, device: str):
    from transferkit.runtimes.runtime import RUNNERS_BY_FORMAT, OnnxRuntime

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
    manifest = record_result(manifest, row, result)  # the runtime reads files and serving fields from the entry
    start = time.perf_counter()
    runtime = None
    try:
        # the bytes verified are the bytes hashed: read once, checked against the record just made, loaded from
        # memory, and that record is the one the manifest keeps (record_result)
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
        single = verify.single_image_failure(runtime, inputs.batch, logits)
        if single is not None:
            report["passed"] = False
            report["failures"] = [*report.get("failures", []), single]
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
    if report["passed"]:  # drift's reference: this artifact's own outputs on the gate's images, kept for free
        name = reference_name(result.format)
        result.records[name] = write_reference(export_dir, result.format, logits, inputs.datasets)
        result.reference = name
    if report["passed"] and runtime is not None:
        fresh = lambda: _verification_runtime(row, result.format, result.precision, device)  # noqa: E731
        result.measured, result.tuning = measure_artifact(fresh, runtime, export_dir, manifest, inputs.batch)
    return result


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
            manifest = record_result(manifest, row, results[name])
            continue
        result = FormatResult(name, EXPORTED, entry.precision, file=files[0], exported=exported, files=files)
        results[name] = _verify_one(
            row, result, manifest, export_dir, inputs, reference, options, entry.device or "cpu", sample
        )
        _withhold_if_slower(results[name], results.get(artifact_name(row.name, "fp32")))
        manifest = record_result(manifest, row, results[name])
    unchanged = old.servable() == manifest.servable() and old.files == manifest.files
    if unchanged and old.bentoml:
        manifest = dataclasses.replace(manifest, bentoml=old.bentoml)
        atomic_write_json(export_dir / VERIFY_NAME, verify_document(inputs, results, sample))
        write_manifest(export_dir, manifest)
        return ExportResult(Path(run_dir), export_dir, results, old.tag)
    return _finish(run_dir, export_dir, manifest, verify_document(inputs, results, sample), results, store)
