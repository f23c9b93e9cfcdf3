"""The export half of the formats table: each row of `transferkit.artifact.FORMAT_SPECS` joined to the code
that makes its file here.

The rows themselves (name, file, runtime, devices, precisions, tolerances, description) are plain data in
`transferkit.artifact`, which serving and the CLI read without importing this package (the serving image has
no torch). This module adds, per row, how to make the file (`export`), whether it can be made on this machine
(`unavailable`) and which formats it is built from (`requires`). `FORMATS` is what export_run, the export
table and `transferkit benchmark` iterate.

Adding a format is one FormatSpec row in `transferkit.artifact`, plus its exporter registered in EXPORTERS
below and its runner registered in `transferkit.serving.runtime`.

    format    file         served by     runs on   precisions   needs
    onnx      model.onnx   onnxruntime   cpu, gpu  fp32         onnx, onnxscript, onnxruntime (core deps)
    tensorrt  model.engine tensorrt      gpu       fp32, fp16   the [gpu] extra (tensorrt) and a CUDA device
    aoti      model.pt2    torch         cpu, gpu  fp32         torch + a C++ compiler (AOTInductor)
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from transferkit.artifact import FORMAT_SPECS, MAX_BATCH, MIN_BATCH, OPT_BATCH, FormatSpec
from transferkit.errors import ConfigError
from transferkit.export.aoti import aoti_unavailable_reason, export_aoti
from transferkit.export.onnx import export_onnx, onnx_unavailable_reason
from transferkit.export.tensorrt import build_engine, tensorrt_unavailable_reason

if TYPE_CHECKING:  # torch is imported by the exporters when they run: `import transferkit.export` stays cheap
    import torch


@dataclass
class ExportJob:
    """What export_run shares between the exporters of one export; each exporter is handed its own part."""

    model: "torch.nn.Module"  # ExportModule in eval mode, on CPU: images -> tuple of logits (head order)
    export_dir: Path
    precision: str  # one of the row's precisions
    device: str  # cpu | cuda | cuda:N: where device-specific artifacts (aoti) are compiled for
    head_names: list[str]
    image_size: int
    artifacts: dict[str, Path] = field(default_factory=dict)  # format -> file already written this export

    def example_input(self, batch: int = 2) -> "torch.Tensor":
        import torch

        # batch 2, not 1: an exporter that sees batch 1 may specialise the dimension to a constant.
        return torch.zeros(batch, 3, self.image_size, self.image_size)


@dataclass(frozen=True)
class Exporter:
    export: Callable[[ExportJob, Path], dict[str, Any]]  # writes the given path atomically -> manifest details
    unavailable: Callable[[str], str | None]  # export device -> None if it can be built here, else why not
    requires: tuple[str, ...] = ()  # formats whose file this one is built from (tensorrt <- onnx)


def _export_onnx(job: ExportJob, path: Path) -> dict[str, Any]:
    return export_onnx(job.model, job.example_input(), path, job.head_names)


def _export_tensorrt(job: ExportJob, path: Path) -> dict[str, Any]:
    onnx_path = job.artifacts.get("onnx") or job.export_dir / FORMAT_SPECS["onnx"].filename
    return build_engine(onnx_path, path, job.precision, job.image_size, (MIN_BATCH, OPT_BATCH, MAX_BATCH))


def _export_aoti(job: ExportJob, path: Path) -> dict[str, Any]:
    return export_aoti(job.model, job.example_input(), path, job.device, (MIN_BATCH, MAX_BATCH))


EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter(_export_onnx, lambda device: onnx_unavailable_reason()),
    "tensorrt": Exporter(_export_tensorrt, lambda device: tensorrt_unavailable_reason(), requires=("onnx",)),
    "aoti": Exporter(_export_aoti, aoti_unavailable_reason),
}


@dataclass(frozen=True)
class ExportFormat(FormatSpec):
    """A FormatSpec row with its exporter: everything export_run needs about one format."""

    export: Callable[[ExportJob, Path], dict[str, Any]]
    unavailable: Callable[[str], str | None]
    requires: tuple[str, ...] = ()

    @classmethod
    def join(cls, spec: FormatSpec, exporter: Exporter) -> "ExportFormat":
        data = {f.name: getattr(spec, f.name) for f in fields(FormatSpec)}
        return cls(**data, export=exporter.export, unavailable=exporter.unavailable, requires=exporter.requires)


# A row without a registered exporter is a KeyError here, at import, not halfway through an export.
FORMATS: dict[str, ExportFormat] = {name: ExportFormat.join(s, EXPORTERS[name]) for name, s in FORMAT_SPECS.items()}


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown export format {name!r}; use one or more of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_request(formats: tuple[str, ...] | list[str], precision: str) -> list[ExportFormat]:
    """Validate --format/--precision before any work: unknown names and disallowed precisions are errors."""
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    if not formats:
        raise ConfigError(f"no export format given; use one or more of {', '.join(FORMATS)}")
    if len(set(formats)) != len(formats):
        raise ConfigError(f"format listed twice: {list(formats)}")
    rows = [get_format(name) for name in formats]
    for row in rows:
        if precision not in row.precisions:
            raise ConfigError(
                f"precision {precision!r} is not available for format {row.name}; "
                f"{row.name} takes {', '.join(row.precisions)}"
            )
    return rows


def with_requirements(rows: list[ExportFormat]) -> list[ExportFormat]:
    """Requested rows plus the formats they are built from, dependencies first (tensorrt -> onnx, tensorrt)."""
    out: list[ExportFormat] = []
    for row in rows:
        for dep in row.requires:
            if FORMATS[dep] not in out:
                out.append(FORMATS[dep])
        if row not in out:
            out.append(row)
    return out
