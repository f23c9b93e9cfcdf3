"""What an exported artifact is: the contract that export writes and serving reads, as plain data.

This module imports nothing heavy (no torch, no onnx, no numpy): it ships in the lean serving image, and the
CLI reads it to build `--help` without loading any engine. Who reads what:

    FORMAT_SPECS   export/formats.py joins each row to its exporter and availability check (FORMATS);
                   runtimes/runtime.py joins each row to its runner and orders `--runtime auto` by `devices`
                   and `auto_rank`; export/pipeline.py writes each row's file, runtime and tolerances into
                   manifest.json and verify.json; cli.py builds the --format help and the --precision and
                   --runtime choices from it
    TOLERANCES     FormatSpec.tolerances, and export/verify.py's default for compare()
    INPUT_NAME     export/onnx.py, export/aoti.py, export/tensorrt.py, manifest.py, runtimes/runtime.py
    MIN/OPT/MAX_BATCH  export/formats.py hands them to the tensorrt and aoti exporters; export/verify.py
                   (images per call), runtimes/runtime.py (default chunk size) and serving/settings.py (the
                   --max-batch ceiling) stay within them
    status words   export/pipeline.py (FormatResult.status, the manifest's "status")
    check_device   config.py (training --device), export/pipeline.py (export device), export/aoti.py

Adding a format is one FormatSpec row below, plus its exporter (registered in export/formats.py) and its
runner (a Runtime subclass registered in runtimes/runtime.py). A row without either fails at import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transferkit.errors import ConfigError

# The one model input: float32 (N, 3, S, S), normalised with the run's preprocessing, NCHW.
INPUT_NAME = "images"

# Dynamic batch range compiled into the formats that need one (TensorRT profile, AOTInductor guards).
# Serving never sends more than MAX_BATCH images in one call (its --max-batch ceiling is MAX_BATCH).
MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 64

# Status of one format after an export, in the words the export table prints.
PASSED = "passed"
EXPORTED = "exported, not verified yet"  # the file is written; verify has not run on it
VERIFY_FAILED = "export ok but verification failed"
EXPORT_FAILED = "export failed"
UNAVAILABLE = "not available here"
# an INT8 artifact that passed the gate but measured slower than its format's fp32 on this machine: not offered
SLOWER_THAN_FP32 = "passed, but slower than fp32 here"
STATUSES = (PASSED, EXPORTED, VERIFY_FAILED, EXPORT_FAILED, UNAVAILABLE, SLOWER_THAN_FP32)


@dataclass(frozen=True)
class Tolerance:
    """How far a format may be from PyTorch and still pass verify (export/verify.py explains each bound)."""

    max_abs_diff: float | None  # relative to max(1, max |reference logit|); None: not checked (int8, bf16)
    min_top1_agreement: float | None  # per head; None: reported, not checked
    max_acc_delta_points: float  # the largest accuracy drop per dataset (points); a gain never fails
    # None: the measured drop is compared (formats held to their logits); else the drop's one-sided upper
    # confidence bound at this level must be within max_acc_delta_points (evaluation/paired.py)
    confidence: float | None = None


# Verify tolerance per precision; every precision a row takes must be here. fp32 and fp16 promise the same
# numbers, so their logits are bounded and the drop is read as measured. INT8 and bf16 logits differ from fp32
# by design, so only what a user sees is bounded, and statistically: the accuracy drop, with 95% confidence.
TOLERANCES = {
    "fp32": Tolerance(max_abs_diff=1e-3, min_top1_agreement=0.99, max_acc_delta_points=0.5),
    "fp16": Tolerance(max_abs_diff=5e-2, min_top1_agreement=0.99, max_acc_delta_points=0.3),
    "bf16": Tolerance(max_abs_diff=None, min_top1_agreement=None, max_acc_delta_points=1.0, confidence=0.95),
    "int8": Tolerance(max_abs_diff=None, min_top1_agreement=None, max_acc_delta_points=1.0, confidence=0.95),
}


@dataclass(frozen=True)
class FormatSpec:
    """One export format, as data: what the file is, what serves it, where it runs, which precisions it takes."""

    name: str  # --format name; the manifest artifact key of its default precision (see artifact_name)
    filename: str  # written to RUN/export/ for the default precision (see artifact_files)
    runtime: str  # --runtime name of the runner that loads the file
    devices: tuple[str, ...]  # where the artifact can run: "cpu", "gpu"
    precisions: tuple[str, ...]  # --precision values it takes; the first is the default
    auto_rank: int  # `--runtime auto` tries lower ranks first among artifacts that run on the same device kind
    description: str  # one line, no semicolons, for `transferkit export --help`
    companions: tuple[str, ...] = ()  # suffixes of files that belong to `filename` (OpenVINO's .bin weights)
    gpu_only_precisions: tuple[str, ...] = ()  # verified anywhere, served only on a GPU (fp16 ONNX on a CPU is slow)

    @property
    def tolerances(self) -> dict[str, Tolerance]:
        """Precision -> the verify tolerance this format is held to."""
        return {p: TOLERANCES[p] for p in self.precisions}


FORMAT_SPECS: dict[str, FormatSpec] = {
    s.name: s
    for s in (
        FormatSpec(
            name="onnx",
            filename="model.onnx",
            runtime="onnxruntime",
            devices=("cpu", "gpu"),
            precisions=("fp32", "int8", "fp16"),
            auto_rank=1,
            description="ONNX, one file, dynamic batch, run by ONNX Runtime (CPU, or CUDA with onnxruntime-gpu)"
            " - int8 is static QDQ quantization, fp16 keeps fp32 inputs and outputs",
            gpu_only_precisions=("fp16",),
        ),
        FormatSpec(
            name="tensorrt",
            filename="model.engine",
            runtime="tensorrt",
            devices=("gpu",),
            precisions=("fp32", "fp16", "int8"),
            auto_rank=0,
            description="TensorRT engine built from the ONNX file for this GPU (needs the [gpu] extra)"
            " - int8 from a symmetric QDQ model of the ONNX file (explicit quantization)",
        ),
        FormatSpec(
            name="aoti",
            filename="model.pt2",
            runtime="torch",
            devices=("cpu", "gpu"),
            precisions=("fp32",),
            auto_rank=2,
            description="AOTInductor package compiled for the export device, needs torch to serve",
        ),
        FormatSpec(
            name="openvino",
            filename="model.xml",
            runtime="openvino",
            devices=("cpu",),
            precisions=("fp32", "int8", "bf16"),
            auto_rank=3,  # unmeasured, after onnxruntime (measured throughput decides first on a CPU)
            description="OpenVINO IR (model.xml + model.bin) converted from the ONNX file, for Intel and AMD CPUs"
            " (needs the [openvino] extra) - int8 is NNCF post-training quantization with quantization-aware"
            " fine-tuning when that fails, bf16 runs in the CPU's bfloat16 units (AVX512-BF16 or AMX only)",
            companions=(".bin",),
        ),
    )
}

# --precision choices: every precision some format takes, in table order.
PRECISIONS = tuple(dict.fromkeys(p for s in FORMAT_SPECS.values() for p in s.precisions))
# --runtime names, in the order `auto` prefers them when their artifacts run on the same device kind.
RUNTIME_NAMES = tuple(s.runtime for s in sorted(FORMAT_SPECS.values(), key=lambda s: s.auto_rank))


def artifact_name(format: str, precision: str) -> str:
    """The manifest artifact key (and `--runtime` name) of one format at one precision: the format's own
    name at its default precision (`onnx`), else `format-precision` (`onnx-int8`), so both can live side by side."""
    spec = FORMAT_SPECS[format]
    return format if precision == spec.precisions[0] else f"{format}-{precision}"


def artifact_files(format: str, precision: str) -> list[str]:
    """The files of one artifact in RUN/export/, main file first: model.onnx, model-int8.onnx, model.xml + .bin."""
    spec = FORMAT_SPECS[format]
    stem, dot, suffix = spec.filename.rpartition(".")
    if precision != spec.precisions[0]:
        stem = f"{stem}-{precision}"
    return [f"{stem}.{suffix}", *(f"{stem}{c}" for c in spec.companions)]


def spec_for_runtime(runtime: str) -> FormatSpec:
    """The row served by `runtime`."""
    return next(s for s in FORMAT_SPECS.values() if s.runtime == runtime)


def check_device(device: str, allow_auto: bool = False) -> str:
    """`cpu`, `cuda` or `cuda:N` (and `auto` where allowed) -> its kind: "cpu", "gpu" or "auto"; else ConfigError."""
    if device == "auto" and allow_auto:
        return "auto"
    if device == "cpu":
        return "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device):
        return "gpu"
    names = ("auto", "cpu", "cuda") if allow_auto else ("cpu", "cuda")
    raise ConfigError(f"device must be {', '.join(names)} or cuda:N, got {device!r}")
