"""The export half of the formats table: each row of `transferkit.artifact.FORMAT_SPECS` joined to the code
that makes its file here.

The rows themselves (name, file, runtime, devices, precisions, tolerances, description) are plain data in
`transferkit.artifact`, which serving and the CLI read without importing this package (the serving image has
no torch). This module adds, per row, how to make the file (`export`), whether it can be made on this machine
(`unavailable`) and which formats it is built from (`requires`). `FORMATS` is what export_run, the export
table and `transferkit benchmark` iterate.

Adding a format is one FormatSpec row in `transferkit.artifact`, plus its exporter registered in EXPORTERS
below and its runner registered in `transferkit.serving.runtime`.

    format    file         served by     runs on   precisions         needs
    onnx      model.onnx   onnxruntime   cpu, gpu  fp32, int8, fp16   onnx, onnxscript, onnxruntime (core deps)
    tensorrt  model.engine tensorrt      gpu       fp32, fp16, int8   the [gpu] extra (tensorrt) and a CUDA device
    aoti      model.pt2    torch         cpu, gpu  fp32               torch + a C++ compiler (AOTInductor)
    openvino  model.xml    openvino      cpu       fp32, int8         the [openvino] extra (openvino, nncf for int8)

One export request is a list of artifacts, (format, precision) pairs: `--format onnx --precision fp32,int8`
asks for `onnx` and `onnx-int8` (transferkit.artifact.artifact_name). An artifact may be built from others
(`requires`): tensorrt from the ONNX file of its precision (int8 from the QDQ model, the others from fp32),
onnx-int8 from the fp32 ONNX file, openvino (both precisions) from the fp32 ONNX file (export/openvino.py).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from transferkit.artifact import (
    FORMAT_SPECS,
    MAX_BATCH,
    MIN_BATCH,
    OPT_BATCH,
    TOLERANCES,
    FormatSpec,
    Tolerance,
    artifact_files,
    artifact_name,
)
from transferkit.errors import ConfigError
from transferkit.export.aoti import aoti_unavailable_reason, export_aoti
from transferkit.export.onnx import export_onnx, export_onnx_fp16, onnx_unavailable_reason, simplify_onnx
from transferkit.export.openvino import export_openvino, openvino_requires, openvino_unavailable_reason
from transferkit.export.quantize import (
    CALIBRATION_METHODS,
    FALLBACKS,
    quantization_unavailable_reason,
    quantize_for_tensorrt,
    quantize_int8,
)
from transferkit.export.tensorrt import build_engine, tensorrt_unavailable_reason

if TYPE_CHECKING:  # torch is imported by the exporters when they run: `import transferkit.export` stays cheap
    import torch


@dataclass
class ExportOptions:
    """Per-export choices beyond format and precision (CLI: `transferkit export --help`)."""

    simplify: bool = False  # onnxslim the fp32 ONNX graph (what every ONNX-based artifact is built from)
    calibration_images: int = 512  # INT8: train images per dataset, through the run's preprocessing
    calibration_method: str = "minmax"  # minmax | entropy | percentile
    int8_fallback: str = "auto"  # auto: keep the layers that break the gate in fp32; off: report the failure
    max_fp32_layers: int = 8  # the repair's budget of layers kept in fp32
    max_acc_delta_points: float | None = None  # overrides the precision's tolerance (per dataset)
    min_top1_agreement: float | None = None  # overrides the precision's tolerance (per head)

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration method {self.calibration_method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
        if self.int8_fallback not in FALLBACKS:
            raise ConfigError(f"--int8-fallback {self.int8_fallback!r}; use one of {', '.join(FALLBACKS)}")
        if self.calibration_images < 1:
            raise ConfigError(f"--calibration-images must be >= 1 (train images per dataset), got {self.calibration_images}")
        if self.max_fp32_layers < 0:
            raise ConfigError(f"--max-fp32-layers must be >= 0, got {self.max_fp32_layers}")
        if self.max_acc_delta_points is not None and not self.max_acc_delta_points >= 0:
            raise ConfigError(f"--max-acc-delta must be >= 0 points, got {self.max_acc_delta_points}")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise ConfigError(f"--min-agreement must be within [0, 1], got {self.min_top1_agreement}")

    def tolerance(self, spec: FormatSpec, precision: str) -> Tolerance:
        """The row's tolerance for `precision`, with this export's overrides."""
        tol = spec.tolerances[precision]
        return replace(
            tol,
            max_acc_delta_points=tol.max_acc_delta_points if self.max_acc_delta_points is None else self.max_acc_delta_points,
            min_top1_agreement=tol.min_top1_agreement if self.min_top1_agreement is None else self.min_top1_agreement,
        )


@dataclass
class ExportJob:
    """What export_run shares between the exporters of one export; each exporter is handed its own part."""

    model: "torch.nn.Module"  # ExportModule in eval mode, on CPU: images -> tuple of logits (head order)
    export_dir: Path
    precision: str  # one of the row's precisions
    device: str  # cpu | cuda | cuda:N: where device-specific artifacts (aoti) are compiled for
    head_names: list[str]
    image_size: int
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact name -> main file written this export
    options: ExportOptions = field(default_factory=ExportOptions)
    # images (float32, normalised) -> the calibration set: train images of every dataset (INT8)
    calibration: Callable[[int], Any] | None = None
    # (ONNX file, precision) -> verify's report against the PyTorch reference (the gate, for the INT8 repair)
    gate: Callable[[Path, str], dict[str, Any]] | None = None

    def example_input(self, batch: int = 2) -> "torch.Tensor":
        import torch

        # batch 2, not 1: an exporter that sees batch 1 may specialise the dimension to a constant.
        return torch.zeros(batch, 3, self.image_size, self.image_size)

    def built(self, format: str, precision: str) -> Path:
        """The main file of an artifact this one is built from (written this export, or an earlier one)."""
        name = artifact_name(format, precision)
        return self.artifacts.get(name) or self.export_dir / artifact_files(format, precision)[0]


@dataclass(frozen=True)
class Exporter:
    export: Callable[[ExportJob, Path], dict[str, Any]]  # writes the given path atomically -> manifest details
    unavailable: Callable[[str, str], str | None]  # (export device, precision) -> None if it can be built here
    # precision -> the (format, precision) artifacts whose files this one is built from
    requires: Callable[[str], tuple[tuple[str, str], ...]] = lambda precision: ()


def _export_onnx(job: ExportJob, path: Path) -> dict[str, Any]:
    if job.precision == "int8":
        return quantize_int8(job.built("onnx", "fp32"), path, job)
    if job.precision == "fp16":
        details = export_onnx_fp16(job.model, job.example_input(), path, job.head_names)
    else:
        details = export_onnx(job.model, job.example_input(), path, job.head_names)
    if job.options.simplify:
        details["simplified"] = simplify_onnx(path, job.head_names, job.image_size)
    return details


def _onnx_requires(precision: str) -> tuple[tuple[str, str], ...]:
    return (("onnx", "fp32"),) if precision == "int8" else ()


def _onnx_unavailable(device: str, precision: str) -> str | None:
    return onnx_unavailable_reason() or (quantization_unavailable_reason() if precision == "int8" else None)


def _export_tensorrt(job: ExportJob, path: Path) -> dict[str, Any]:
    batches = (MIN_BATCH, OPT_BATCH, MAX_BATCH)
    if job.precision != "int8":
        return build_engine(job.built("onnx", "fp32"), path, job.precision, job.image_size, batches)
    # INT8 is explicit quantization: TensorRT reads the scales from a QDQ model's Q/DQ nodes, and takes only
    # symmetric ones, so the engine gets its own QDQ file (onnx-int8's asymmetric uint8 suits ONNX Runtime).
    with tempfile.TemporaryDirectory(prefix="transferkit-trt-int8-", dir=job.export_dir) as tmp:
        qdq = Path(tmp) / "model-int8-symmetric.onnx"
        quantization = quantize_for_tensorrt(job.built("onnx", "fp32"), qdq, job)
        details = build_engine(qdq, path, job.precision, job.image_size, batches)
    return {**details, "built_from": job.built("onnx", "fp32").name, "quantization": quantization}


def _export_aoti(job: ExportJob, path: Path) -> dict[str, Any]:
    return export_aoti(job.model, job.example_input(), path, job.device, (MIN_BATCH, MAX_BATCH))


EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter(_export_onnx, _onnx_unavailable, requires=_onnx_requires),
    "tensorrt": Exporter(_export_tensorrt, lambda device, precision: tensorrt_unavailable_reason(),
                         requires=lambda precision: (("onnx", "fp32"),)),  # fmt: skip
    "aoti": Exporter(_export_aoti, lambda device, precision: aoti_unavailable_reason(device)),
    "openvino": Exporter(export_openvino, openvino_unavailable_reason, requires=openvino_requires),
}


@dataclass(frozen=True, kw_only=True)
class ExportFormat(FormatSpec):
    """A FormatSpec row with its exporter: everything export_run needs about one format."""

    export: Callable[[ExportJob, Path], dict[str, Any]]
    unavailable: Callable[[str, str], str | None]
    requires: Callable[[str], tuple[tuple[str, str], ...]] = lambda precision: ()

    @classmethod
    def join(cls, spec: FormatSpec, exporter: Exporter) -> "ExportFormat":
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


def check_request(formats: tuple[str, ...] | list[str] | str, precision: tuple[str, ...] | list[str] | str = "fp32"
                  ) -> list[ArtifactRequest]:  # fmt: skip
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
