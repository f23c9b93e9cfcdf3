"""The one table of export formats. Export, verification, the manifest, serving and the benchmark all read it.

A row says what a format is (file name, the runtime that serves it, where it runs, which precisions it takes)
and how to make it (`export`) and whether it can be made here (`unavailable`). Adding a format is adding a row.

    format    file         served by     runs on   precisions   needs
    onnx      model.onnx   onnxruntime   cpu, gpu  fp32         onnx, onnxscript, onnxruntime (core deps)
    tensorrt  model.engine tensorrt      gpu       fp32, fp16   the [gpu] extra (tensorrt) and a CUDA device
    aoti      model.pt2    torch         cpu, gpu  fp32         torch + a C++ compiler (AOTInductor)
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from transferkit.errors import ConfigError

if TYPE_CHECKING:  # torch is imported lazily: `import transferkit.export.formats` stays cheap
    import torch

    from transferkit.runs import Run

# Status of one format after `export_run`, in the words the table prints.
PASSED = "passed"
VERIFY_FAILED = "export ok but verification failed"
EXPORT_FAILED = "export failed"
UNAVAILABLE = "not available here"
STATUSES = (PASSED, VERIFY_FAILED, EXPORT_FAILED, UNAVAILABLE)

# Dynamic batch range compiled into formats that need one (TensorRT profile, AOTInductor guards).
# Serving never sends more than MAX_BATCH images in one call (the service's max_batch_size is below it).
MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 64


@dataclass
class ExportJob:
    """Everything an exporter needs; built once by `export_run` and handed to each row's `export`."""

    model: "torch.nn.Module"  # ExportModule in eval mode, on CPU: images -> tuple of logits (head order)
    run: "Run"
    export_dir: Path
    precision: str  # one of the row's precisions
    device: str  # cpu | cuda | cuda:N: where device-specific artifacts (aoti) are compiled for
    head_names: list[str]
    artifacts: dict[str, Path] = field(default_factory=dict)  # format -> file already written this export

    @property
    def image_size(self) -> int:
        return self.run.preprocessing.image_size

    def example_input(self, batch: int = 2) -> "torch.Tensor":
        import torch

        # batch 2, not 1: an exporter that sees batch 1 may specialise the dimension to a constant.
        return torch.zeros(batch, 3, self.image_size, self.image_size)


@dataclass(frozen=True)
class ExportFormat:
    name: str  # the CLI name (--format)
    filename: str  # written to RUN/export/
    runtime: str  # serving runtime that loads the file (transferkit.serving.runtime.RUNTIMES)
    devices: tuple[str, ...]  # where the artifact can run: "cpu", "gpu"
    precisions: tuple[str, ...]  # allowed --precision values; the first is the default
    export: Callable[[ExportJob], dict[str, Any]]  # writes export_dir/filename atomically -> details
    unavailable: Callable[[str], str | None]  # device -> None if it can be built here, else why not
    requires: tuple[str, ...] = ()  # formats whose file this one is built from (tensorrt <- onnx)
    description: str = ""


# ---- availability checks (cheap: no heavy imports unless the package exists) ----------------------
def _onnx_unavailable(device: str) -> str | None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing Python package(s) {missing}: pip install onnx onnxscript onnxruntime"
    return None


def _tensorrt_unavailable(device: str) -> str | None:
    from transferkit.export.tensorrt import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason()


def _aoti_unavailable(device: str) -> str | None:
    from transferkit.export.aoti import aoti_unavailable_reason

    return aoti_unavailable_reason(device)


# ---- exporters (imported on use) ------------------------------------------------------------------
def _export_onnx(job: ExportJob) -> dict[str, Any]:
    from transferkit.export.onnx import export_onnx

    return export_onnx(job)


def _export_tensorrt(job: ExportJob) -> dict[str, Any]:
    from transferkit.export.tensorrt import build_engine

    return build_engine(job)


def _export_aoti(job: ExportJob) -> dict[str, Any]:
    from transferkit.export.aoti import export_aoti

    return export_aoti(job)


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            name="onnx",
            filename="model.onnx",
            runtime="onnxruntime",
            devices=("cpu", "gpu"),
            precisions=("fp32",),
            export=_export_onnx,
            unavailable=_onnx_unavailable,
            description="ONNX (torch.onnx dynamo exporter), one file, dynamic batch; served by ONNX Runtime",
        ),
        ExportFormat(
            name="tensorrt",
            filename="model.engine",
            runtime="tensorrt",
            devices=("gpu",),
            precisions=("fp32", "fp16"),
            export=_export_tensorrt,
            unavailable=_tensorrt_unavailable,
            requires=("onnx",),
            description="TensorRT engine built from the ONNX file for this GPU (not portable across GPU models)",
        ),
        ExportFormat(
            name="aoti",
            filename="model.pt2",
            runtime="torch",
            devices=("cpu", "gpu"),
            precisions=("fp32",),
            export=_export_aoti,
            unavailable=_aoti_unavailable,
            description="AOTInductor package (torch._inductor.aoti_compile_and_package) for the export device",
        ),
    )
}


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
