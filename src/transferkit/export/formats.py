"""The export half of the formats table: each row of `transferkit.artifact.FORMAT_SPECS` joined to the code
that makes its file here.

The rows themselves (name, file, runtime, devices, precisions, tolerances, description) are plain data in
`transferkit.artifact`, which serving and the CLI read without importing this package (the serving image has
no torch). This module adds, per row, how to make the file (`export`), whether it can be made on this machine
(`unavailable`) and which formats it is built from (`requires`). `FORMATS` is what export_run, the export
table and `transferkit benchmark` iterate.

Adding a format is one FormatSpec row in `transferkit.artifact`, plus its exporter registered in EXPORTERS
below and its runner registered in `transferkit.runtimes.runtime`.

    format    file         served by     runs on   precisions         needs
    onnx      model.onnx   onnxruntime   cpu, gpu  fp32, int8, fp16   onnx, onnxscript, onnxruntime (core deps)
    tensorrt  model.engine tensorrt      gpu       fp32, fp16, int8   the [gpu] extra (tensorrt) and a CUDA device
    aoti      model.pt2    torch         cpu, gpu  fp32               torch + a C++ compiler (AOTInductor)
    openvino  model.xml    openvino      cpu       fp32, int8, bf16   the [openvino] extra (openvino, nncf for int8); bf16: a CPU with native bf16

One export request is a list of artifacts, (format, precision) pairs: `--format onnx --precision fp32,int8`
asks for `onnx` and `onnx-int8` (transferkit.artifact.artifact_name). An artifact may be built from others
(`requires`): tensorrt from the ONNX file of its precision (int8 from the QDQ model, the others from fp32),
onnx-int8 from the fp32 ONNX file, openvino (every precision) from the fp32 ONNX file (export/openvino.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from transferkit.artifact import (
    FORMAT_SPECS,
    MAX_BATCH,
    MIN_BATCH,
    OPT_BATCH,
    TOLERANCES,
    FormatSpec,
    artifact_files,
    artifact_name,
)
from transferkit.errors import ConfigError
from transferkit.export.aoti import aoti_unavailable_reason, export_aoti
from transferkit.export.job import Exported, ExportJob
from transferkit.export.onnx import export_onnx, export_onnx_fp16, onnx_unavailable_reason, simplify_onnx
from transferkit.export.openvino import export_openvino, openvino_requires, openvino_unavailable_reason
from transferkit.export.quantize import quantization_unavailable_reason, quantize_for_tensorrt, quantize_onnx_int8
from transferkit.export.tensorrt import build_engine, tensorrt_unavailable_reason


@dataclass(frozen=True)
class Exporter:
    export: Callable[[ExportJob, Path], Exported]  # writes the given path atomically
    unavailable: Callable[[str, str], str | None]  # (export device, precision) -> None if it can be built here
    # precision -> the (format, precision) artifacts whose files this one is built from
    requires: Callable[[str], tuple[tuple[str, str], ...]] = lambda precision: ()


def _export_onnx(job: ExportJob, path: Path) -> Exported:
    if job.precision == "int8":
        return Exported(quantize_onnx_int8(job.built("onnx", "fp32"), path, job))
    if job.precision == "fp16":
        details = export_onnx_fp16(job.model, job.example_input(), path, job.head_names)
    else:
        details = export_onnx(job.model, job.example_input(), path, job.head_names)
    if job.options.simplify:
        details["simplified"] = simplify_onnx(path, job.head_names, job.image_size)
    return Exported(details)


def _onnx_requires(precision: str) -> tuple[tuple[str, str], ...]:
    return (("onnx", "fp32"),) if precision == "int8" else ()


def _onnx_unavailable(device: str, precision: str) -> str | None:
    return onnx_unavailable_reason() or (quantization_unavailable_reason() if precision == "int8" else None)


def _export_tensorrt(job: ExportJob, path: Path) -> Exported:
    batches = (MIN_BATCH, OPT_BATCH, MAX_BATCH)
    if job.precision != "int8":
        details = build_engine(job.built("onnx", "fp32"), path, job.precision, job.image_size, batches)
    else:
        # INT8 is explicit quantization: TensorRT reads the scales from a QDQ model's Q/DQ nodes, and takes only
        # symmetric ones, so the engine gets its own QDQ file (onnx-int8's asymmetric uint8 suits ONNX Runtime).
        with tempfile.TemporaryDirectory(prefix="transferkit-trt-int8-", dir=job.export_dir) as tmp:
            qdq = Path(tmp) / "model-int8-symmetric.onnx"
            quantization = quantize_for_tensorrt(job.built("onnx", "fp32"), qdq, job)
            details = build_engine(qdq, path, job.precision, job.image_size, batches)
        details = {**details, "built_from": job.built("onnx", "fp32").name, "quantization": quantization}
    return Exported(details, batch_range=(MIN_BATCH, MAX_BATCH), built_for_gpu=details["built_for_gpu"]["name"])


def _export_aoti(job: ExportJob, path: Path) -> Exported:
    details = export_aoti(job.model, job.example_input(), path, job.device, (MIN_BATCH, MAX_BATCH))
    return Exported(details, batch_range=(MIN_BATCH, MAX_BATCH), device=details["device"])


EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter(_export_onnx, _onnx_unavailable, requires=_onnx_requires),
    "tensorrt": Exporter(
        _export_tensorrt,
        lambda device, precision: tensorrt_unavailable_reason(),
        requires=lambda precision: (("onnx", "fp32"),),
    ),
    "aoti": Exporter(_export_aoti, lambda device, precision: aoti_unavailable_reason(device)),
    "openvino": Exporter(export_openvino, openvino_unavailable_reason, requires=openvino_requires),
}


@dataclass(frozen=True, kw_only=True)
class ExportFormat(FormatSpec):
    """A FormatSpec row with its exporter: everything export_run needs about one format."""

    export: Callable[[ExportJob, Path], Exported]
    unavailable: Callable[[str, str], str | None]
    requires: Callable[[str], tuple[tuple[str, str], ...]] = lambda precision: ()

    @classmethod
    def join(cls, spec: FormatSpec, exporter: Exporter) -> ExportFormat:
        data = {f.name: getattr(spec, f.name) for f in fields(FormatSpec)}
        return cls(**data, export=exporter.export, unavailable=exporter.unavailable, requires=exporter.requires)


# A row without a registered exporter is a KeyError here, at import, not halfway through an export.
FORMATS: dict[str, ExportFormat] = {name: ExportFormat.join(s, EXPORTERS[name]) for name, s in FORMAT_SPECS.items()}


@dataclass(frozen=True)
class ArtifactRequest:
    """One artifact of an export: a format at a precision."""

    row: ExportFormat
    precision: str
    requested: bool = True  # False when built only because a requested artifact needs it

    @property
    def name(self) -> str:
        return artifact_name(self.row.name, self.precision)

    @property
    def files(self) -> list[str]:
        return artifact_files(self.row.name, self.precision)


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown export format {name!r}; use one or more of {', '.join(FORMATS)}")
    return FORMATS[name]


def _names(value: tuple[str, ...] | list[str] | str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def check_request(
    formats: tuple[str, ...] | list[str] | str, precision: tuple[str, ...] | list[str] | str = "fp32"
) -> list[ArtifactRequest]:
    """Validate --format/--precision before any work -> the artifacts asked for: every format at every
    precision it takes. An unknown name, a precision no listed format takes, or a format that takes none of
    the listed precisions is an error."""
    formats, precisions = _names(formats), _names(precision)
    if not formats:
        raise ConfigError(f"no export format given; use one or more of {', '.join(FORMATS)}")
    if not precisions:
        raise ConfigError(f"no precision given; use one or more of {', '.join(TOLERANCES)}")
    for kind, values in (("format", formats), ("precision", precisions)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{kind} listed twice: {values}")
    rows = [get_format(name) for name in formats]
    for p in precisions:
        if not any(p in row.precisions for row in rows):
            takes = "; ".join(f"{row.name} takes {', '.join(row.precisions)}" for row in rows)
            raise ConfigError(f"precision {p!r} is not available for format {', '.join(formats)}: {takes}")
    for row in rows:
        if not any(p in row.precisions for p in precisions):
            raise ConfigError(f"format {row.name} takes {', '.join(row.precisions)}, none of {', '.join(precisions)}")
    return [ArtifactRequest(row, p) for row in rows for p in precisions if p in row.precisions]


def with_requirements(requests: list[ArtifactRequest], device: str) -> list[ArtifactRequest]:
    """Requested artifacts plus those they are built from, dependencies first (tensorrt-int8 -> onnx,
    onnx-int8, tensorrt-int8). A dependency that was also requested keeps requested=True."""
    out: dict[str, ArtifactRequest] = {}
    requested = {r.name for r in requests}

    def add(req: ArtifactRequest) -> None:
        if req.row.unavailable(device, req.precision) is None:  # what cannot be built needs nothing built
            for fmt, precision in req.row.requires(req.precision):
                dep = ArtifactRequest(FORMATS[fmt], precision, artifact_name(fmt, precision) in requested)
                if dep.name not in out:
                    add(dep)
        out.setdefault(req.name, req)

    for req in requests:
        add(req)
    return list(out.values())
