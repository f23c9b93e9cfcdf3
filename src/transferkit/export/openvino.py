"""OpenVINO IR (model.xml + model.bin): the CPU compiler for Intel and AMD servers, built from the ONNX export.

    model.onnx (fp32) --openvino.convert_model--> save_model(compress_to_fp16=False) --> model.xml + model.bin
    model.onnx (fp32) --convert_model--> nncf.quantize(calibration images) --> model-int8.xml + model-int8.bin

Why from the ONNX file and not from PyTorch: the ONNX file is already verified against PyTorch, has the input
name, the dynamic batch and the output names (one per head) that serving relies on, and `convert_model` keeps
all three; converting from torch again would be a second tracing path to keep equal.

fp32: `save_model` compresses weights to fp16 by default, which changes the numbers; the fp32 artifact is held
to fp32 tolerance, so it is saved uncompressed.

bf16: the same graph with fp16 weights, compiled by the CPU plugin with INFERENCE_PRECISION_HINT bf16 (what it
picks by itself on CPUs with AVX512-BF16 or AMX, and 1.7x ORT fp32 at 224 px on the AVX512-BF16 EPYC). Built
only where the CPU runs bf16 natively; gated like INT8, on the accuracy drop's confidence bound.

int8: the INT8 search (export/int8.py) over NNCF post-training quantization of the converted model: the default
(MIXED preset, fast bias correction), quantile activation ranges, full bias correction, twice the calibration
images, then NNCF accuracy control, which keeps the operations that hurt most in fp32; each is judged on the
validation split and the fastest that passes is saved. Calibration uses the same images as ONNX INT8
(`job.calibration`, train images of every dataset, never the test images the gate judges on). The images go in
one per item: NNCF counts `subset_size` in items and collects per-item statistics, so batches of one make
`subset_size` the number of images and keep the min/max statistics exact. The MIXED preset (symmetric weights,
asymmetric activations) matches ONNX INT8's uint8 activations. export_run then verifies the IR through the
serving runtime on the test split and reports a gate failure like any artifact's, with the numbers in verify.json.

An IR is two files: the XML graph and the weights it names by stem (model-int8.xml reads model-int8.bin). Both
are written into a temporary folder beside the target, fsynced, then renamed, weights first and the XML last,
so a reader never finds a new XML with old weights and a failed export leaves no half-written pair.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.artifact import INPUT_NAME
from transferkit.errors import TransferkitError
from transferkit.export.int8 import (
    Candidate,
    Engine,
    Plan,
    batched_logits,
    int8_details,
    nncf_accuracy_control,
    qat_plan,
    search,
)
from transferkit.export.job import Exported

if TYPE_CHECKING:
    import openvino
    import torch

    from transferkit.export.job import ExportJob

INSTALL_HINT = "pip install 'transferkit[openvino]'"
NNCF_PRESET = "mixed"  # symmetric int8 weights, asymmetric uint8 activations (like the QDQ model's)


@functools.cache
def _import_problem(module: str) -> str | None:
    """Why `module` does not import (missing, or a broken install), once per process."""
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means the format cannot be built here
        return f"{module} does not import ({type(exc).__name__}); {INSTALL_HINT}"
    return None


def openvino_unavailable_reason(device: str, precision: str) -> str | None:
    """None when the IR can be built here. Conversion and calibration run on the CPU whatever the export device
    (`--device cuda` only decides where device-specific artifacts compile), so the device does not matter."""
    problem = _import_problem("openvino") or (_import_problem("nncf") if precision == "int8" else None)
    if problem is None and precision == "bf16":
        from transferkit.runtimes.runtime import OpenVinoRuntime

        problem = OpenVinoRuntime.bf16_unavailable_reason()
    return problem


def openvino_requires(precision: str) -> tuple[tuple[str, str], ...]:
    return (("onnx", "fp32"),)  # both precisions start from the verified fp32 ONNX file


def export_openvino(job: ExportJob, path: Path) -> Exported:
    """The ONNX fp32 file -> the IR at `path` (and its .bin) for job.precision -> manifest details."""
    import openvino as ov

    source = job.built("onnx", "fp32")
    if not source.is_file():
        raise TransferkitError(f"{source} is missing; OpenVINO IR is built from the fp32 onnx export")
    model = convert(source, job.head_names)
    details: dict[str, Any] = {"openvino": ov.get_version(), "built_from": source.name, "compress_to_fp16": False}
    compress = False
    if job.precision == "int8":
        model, int8 = quantize_nncf(model, job)
        details.update(int8)
    elif job.precision == "bf16":  # the same graph, run by the CPU plugin in bfloat16 (runtimes/runtime.py)
        compress = True  # weights stored in fp16: half the file, and bf16 keeps fewer bits than either
        details.update(compress_to_fp16=True, inference_precision="bf16")
    elif job.precision != "fp32":
        raise TransferkitError(f"OpenVINO takes fp32, int8 or bf16, not {job.precision}")
    save_ir(model, path, compress)
    return Exported(details)


def convert(onnx_path: Path, head_names: list[str]) -> openvino.Model:
    """ONNX -> an in-memory OpenVINO model, checked (`checked_model`)."""
    import openvino as ov

    return checked_model(ov.convert_model(str(onnx_path)), head_names, onnx_path.name)


def checked_model(model: openvino.Model, head_names: list[str], source: str) -> openvino.Model:
    """A converted model, checked to keep what serving relies on: one input named INPUT_NAME with a dynamic
    batch, and one output per head, named after it (a name conversion dropped is put back, so the runtime can
    always read the heads by name)."""
    inputs = [i.get_any_name() for i in model.inputs]
    if inputs != [INPUT_NAME]:
        raise TransferkitError(f"{source} converts to inputs {inputs}, expected [{INPUT_NAME!r}]")
    if not model.inputs[0].get_partial_shape()[0].is_dynamic:
        raise TransferkitError(f"{source}: the batch dimension of {INPUT_NAME!r} is static after conversion")
    if len(model.outputs) != len(head_names):
        raise TransferkitError(f"{source} converts to {len(model.outputs)} outputs, expected the heads {head_names}")
    for output, head in zip(model.outputs, head_names):
        if head not in output.get_names():  # the outputs are the heads, in order (export/onnx.py, ExportModule)
            output.get_tensor().set_names({head, *output.get_names()})
    return model


class OpenVinoEngine(Engine):
    """Runs candidate OpenVINO models on the CPU plugin in fp32 inference precision (as served), compiling each
    model once; NNCF's accuracy control hands its validation function a model it already compiled."""

    def __init__(self, heads: list[str]) -> None:
        super().__init__(self._logits)
        self.heads = heads
        self._cache: tuple[Any, Any] | None = None  # (model, compiled): the model held, so its id stays unique

    def _logits(self, model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
        import openvino as ov

        if isinstance(model, ov.CompiledModel):
            compiled = model
        else:
            if self._cache is None or self._cache[0] is not model:
                self._cache = (model, ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}))
            compiled = self._cache[1]
        ports = [next(o for o in compiled.outputs if h in o.get_names()) for h in self.heads]

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            out = compiled({INPUT_NAME: x})
            return {h: np.asarray(out[p]) for h, p in zip(self.heads, ports)}

        return batched_logits(run, images, self.heads)


def openvino_int8_plans(
    model: openvino.Model, job: ExportJob, calibration: np.ndarray, engine: OpenVinoEngine
) -> list[Plan]:
    """What the search tries for openvino-int8, in order: NNCF's default (mixed preset, fast bias correction), full
    bias correction, then NNCF accuracy control (mixed precision, only if neither passed), then twice the
    calibration images. Accuracy control comes before the slowest full attempt so that it still fits the budget
    (on the 224 px benchmark the four full attempts alone spent it). Quantile ranges (NNCF's percentile) are not
    tried: on MobileNetV2 they cost 10-43 points on every benchmark run. SmoothQuant is not either: NNCF applies
    it to MatMul inputs of transformers, and a CNN's convolutions have none."""
    import nncf

    options = job.options
    preset = nncf.QuantizationPreset(NNCF_PRESET)

    def dataset(images: np.ndarray) -> nncf.Dataset:
        return nncf.Dataset([{INPUT_NAME: images[i : i + 1]} for i in range(len(images))])  # one image per item

    def quantize(images: np.ndarray = calibration, **kwargs: Any) -> Candidate:
        return Candidate(nncf.quantize(model, dataset(images), preset=preset, subset_size=len(images), **kwargs))

    def more_images() -> Candidate:
        images = job.calibration(2 * options.calibration_images)
        if len(images) <= len(calibration):
            raise TransferkitError(f"the train splits have no more than the {len(calibration)} images already used")
        return quantize(images)

    base = {
        "tool": "nncf.quantize (OpenVINO)",
        "nncf": nncf.__version__,
        "preset": NNCF_PRESET,
        "subset_size": int(len(calibration)),
        "fast_bias_correction": True,
    }
    return [
        Plan("nncf", base, quantize, graph="nncf"),
        Plan(
            "nncf-bias-correction",
            {**base, "fast_bias_correction": False},
            lambda: quantize(fast_bias_correction=False),
            graph="nncf",
        ),
        *qat_plans(job, calibration, engine),
        Plan(
            "nncf-accuracy-control",
            {
                **base,
                "tool": "nncf.quantize_with_accuracy_control (OpenVINO)",
                "max_drop": "the gate's bounds on validation",
                "max_num_iterations": options.max_fp32_layers,
            },
            lambda: nncf_accuracy_control(model, calibration, job.selection, engine, options, preset=preset),
            mixed=True,
        ),
        Plan(
            "nncf-more-images",
            {**base, "calibration_images_per_dataset": 2 * options.calibration_images},
            more_images,
            graph="nncf",
        ),
    ]


def qat_plans(job: ExportJob, calibration: np.ndarray, engine: OpenVinoEngine) -> list[Plan]:
    """The quantization-aware attempt for openvino-int8 (export/qat.py), when the export can train one."""
    if job.qat is None:
        return []
    from transferkit.export.qat import QAT_PRESET

    settings = {"tool": "nncf.quantize (PyTorch) + fine-tuning", "preset": QAT_PRESET, "max_steps": job.qat.steps}
    convert = lambda model: to_openvino(model, job.head_names, job.image_size)  # noqa: E731
    return [qat_plan(job.qat, calibration, engine, convert, settings)]


def to_openvino(quantized: torch.nn.Module, heads: list[str], image_size: int) -> openvino.Model:
    """The quantization-aware model (export/qat.py) as an OpenVINO model with FakeQuantize operations (what NNCF's
    QAT examples deploy), checked and named like every IR."""
    import openvino as ov
    import torch

    from transferkit.export.qat import export_module

    example = torch.zeros(2, 3, image_size, image_size)
    # the tracer's own check compares two traces of a model whose quantizers round: it warns on every export
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(
            export_module(quantized), example_input=example, input=[ov.PartialShape([-1, 3, image_size, image_size])]
        )
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    return checked_model(model, heads, "the quantization-aware model")


def quantize_nncf(model: openvino.Model, job: ExportJob) -> tuple[openvino.Model, dict[str, Any]]:
    """The fastest NNCF INT8 model that passes on the validation split (export/int8.py), with every attempt."""
    if job.calibration is None or job.selection is None:
        raise TransferkitError("INT8 export needs calibration images and the validation split (export_run gives both)")
    calibration = job.calibration(job.options.calibration_images)
    engine = OpenVinoEngine(job.head_names)
    result = search(
        openvino_int8_plans(model, job, calibration, engine),
        engine,
        job.selection,
        job.options,
        fp32_model=model,
        clock=job.int8_clock,
    )
    if result.chosen is None:
        raise TransferkitError(
            "every INT8 attempt failed: "
            + "; ".join(f"{a['name']}: {a.get('error', a['status'])}" for a in result.attempts)
        )
    return result.chosen.model, int8_details(
        job.built("onnx", "fp32").name, result, calibration, job.selection, job.options
    )


def save_ir(model: openvino.Model, path: Path, compress_to_fp16: bool = False) -> None:
    """Write the IR pair at `path` (.xml) and path.with_suffix('.bin') atomically: weights first, XML last."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name  # the same stem: the XML finds its weights by name
        ov.save_model(model, str(staged), compress_to_fp16=compress_to_fp16)
        weights = staged.with_suffix(".bin")
        for f in (weights, staged):
            if not f.is_file():
                raise TransferkitError(f"openvino.save_model wrote no {f.name}")
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(weights, path.with_suffix(".bin"))
        os.replace(staged, path)
