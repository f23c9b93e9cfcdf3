"""INT8 ONNX: the attempts the INT8 search (export/int8.py) makes for onnx-int8, and the QDQ graph edits they use.

    model.onnx (fp32) --quant_pre_process--> quantize_static(QDQ, per-channel int8 weights, uint8 activations,
    calibrated on train images of every dataset) with minmax, entropy, percentile     (post-training, fully INT8)
                     --> quantization-aware: the fine-tuned weights through quantize_static, then NNCF's
                         quantizers as QDQ (export/qat.py)                               (fully INT8)
                     --> the per-layer repair of the first QDQ model                     (mixed precision)
                     --> nncf.quantize_with_accuracy_control(ONNX)                       (mixed precision)
    each judged on the validation split; the fastest that passes is written to model-int8.onnx

Post-training NNCF on the ONNX model is not tried: its QDQ layout keeps BatchNorm behind the weights' Q/DQ
pairs, which ONNX Runtime cannot fuse (0.12-0.38x fp32 in benchmarks/export_formats.py runs, after 39-678 s),
so it only spent the budget.

Static INT8 of depthwise-separable networks can lose several points on one dataset with no error raised (a
MobileNetV2 fine-tuned on MNIST + Fashion-MNIST loses 3 points on Fashion-MNIST with every calibration method),
which is why every INT8 file is gated and why mixed precision exists. The per-layer repair is a graph edit on
the quantized model: a layer kept in fp32 reads the fp32 tensors and weights its Q/DQ pair stood for, and Q/DQ
nodes nobody reads any more are dropped, so every other layer keeps the scales calibration gave it and each
step costs one validation, not a new calibration. It stays beside NNCF's accuracy control because the two rank
layers differently (end-to-end logit error here, per-image agreement there), and the search keeps whichever
passes faster. The same QDQ form is what TensorRT's explicit quantization consumes (export/tensorrt.py).
"""

from __future__ import annotations

import importlib.util
import tempfile
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
from transferkit.export.job import CALIBRATION_METHODS
from transferkit.export.layer_repair import repair_layers
from transferkit.utils import atomic_write

if TYPE_CHECKING:
    import onnx

    from transferkit.export.job import ExportJob

CALIBRATION_BATCH = 32


def quantization_unavailable_reason() -> str | None:
    if importlib.util.find_spec("onnxruntime.quantization") is None:
        return "onnxruntime.quantization is missing: pip install onnxruntime"
    return None


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an in-memory batch."""

    def __init__(self, images: np.ndarray) -> None:
        self.images, self.offset = images, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.offset >= len(self.images):
            return None
        batch = self.images[self.offset : self.offset + CALIBRATION_BATCH]
        self.offset += CALIBRATION_BATCH
        return {INPUT_NAME: batch}

    def rewind(self) -> None:
        self.offset = 0


HISTOGRAM_MEMORY_BYTES = 4 * 2**30  # entropy/percentile keep every activation of every image until the end


def _activation_bytes_per_image(model_path: Path) -> int:
    """The float activations one image produces in a shape-inferred model (what histogram calibration holds)."""
    import onnx

    total = 0
    for info in onnx.load(str(model_path), load_external_data=False).graph.value_info:
        t = info.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and len(t.shape.dim) > 1:
            total += 4 * int(np.prod([d.dim_value or 1 for d in t.shape.dim[1:]]))
    return max(total, 1)


def quantize_qdq(
    fp32_path: Path, out_path: Path, prepared: Path, calibration: np.ndarray, method: str, symmetric: bool = False
) -> int:
    """Static QDQ quantization: per-channel int8 weights, uint8 (or, `symmetric`, int8) activations calibrated
    on `calibration` -> the number of images used. onnxruntime's histogram methods (entropy, percentile) keep
    every activation of every calibration image in memory (15 GB for 512 images at 224 px): they get as many
    images as fit in HISTOGRAM_MEMORY_BYTES. `prepared` receives the fp32 model as quantized (after
    onnxruntime's pre-processing): the graph whose node names and tensors the QDQ model shares."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    # shape inference + constant folding, as onnxruntime recommends before quantizing
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
    extra: dict[str, Any] = {"QDQKeepRemovableActivations": True, "ActivationSymmetric": symmetric}
    if method != "minmax":  # (minmax with CalibMaxIntermediateOutputs loses its last ranges: "No data is collected")
        fits = HISTOGRAM_MEMORY_BYTES // _activation_bytes_per_image(prepared)
        # whole batches only: the histogram calibrators stack every batch's activations into one array, and a
        # shorter last batch makes it ragged ("inhomogeneous shape")
        n = max(CALIBRATION_BATCH, int(min(fits, len(calibration))) // CALIBRATION_BATCH * CALIBRATION_BATCH)
        calibration = calibration[:n]
    # Clip/Relu stay in the graph (by default the quantizer drops them and lets the Q node's range clip): a layer
    # kept in fp32 then reads the clipped tensor, as in the fp32 model. ORT still fuses them when it loads.
    # `symmetric`: int8 activations with zero points of 0, what TensorRT's explicit quantization accepts (ONNX
    # Runtime on x86 is faster with the default uint8 activations).
    quantize_static(
        str(prepared),
        str(out_path),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        calibrate_method=methods[method],
        extra_options=extra,
    )
    return int(len(calibration))


class OnnxEngine(Engine):
    """Runs candidate ModelProtos in ONNX Runtime as served (all optimisations, CPU), one session per model."""

    def __init__(self, heads: list[str]) -> None:
        super().__init__(self._logits)
        self.heads = heads
        self._cache: tuple[Any, Any] | None = None  # (model, session): the model held, so its id stays unique

    def _logits(self, model: onnx.ModelProto, images: np.ndarray) -> dict[str, np.ndarray]:
        from transferkit.runtimes.runtime import onnx_session

        if self._cache is None or self._cache[0] is not model:
            self._cache = (model, onnx_session(model.SerializeToString()))
        session = self._cache[1]
        return batched_logits(
            lambda x: dict(zip(self.heads, session.run(self.heads, {INPUT_NAME: x}))), images, self.heads
        )


def onnx_int8_plans(
    fp32_path: Path, tmp: Path, job: ExportJob, calibration: np.ndarray, engine: OnnxEngine
) -> list[Plan]:
    """What the search tries for onnx-int8, in order: onnxruntime's static QDQ quantization with each calibration
    method (the chosen --calibration-method first); the quantization-aware attempts; then, mixed precision, the
    per-layer repair of the first QDQ model and NNCF accuracy control."""
    import onnx

    options, selection = job.options, job.selection
    prepared = tmp / "prepared.onnx"
    first: dict[str, Any] = {}
    methods = [options.calibration_method, *(m for m in CALIBRATION_METHODS if m != options.calibration_method)]

    def ort(method: str) -> Candidate:
        out = tmp / f"ort-{method}.onnx"
        used = quantize_qdq(fp32_path, out, prepared, calibration, method)
        model = onnx.load(str(out))
        first.setdefault("qdq", model)
        return Candidate(model, notes={"calibration_images_used": used})

    def nncf_controlled() -> Candidate:
        import nncf

        return nncf_accuracy_control(
            onnx.load(str(fp32_path)), calibration, selection, engine, options, preset=nncf.QuantizationPreset.MIXED
        )

    def layer_repair() -> Candidate:
        if "qdq" not in first:
            ort(methods[0])
        return repair_layers(first["qdq"], onnx.load(str(prepared)), fp32_path, job, engine)

    ort_settings = {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "per_channel": True,
        "weights": "int8",
        "activations": "uint8",
    }
    nncf_settings = {"tool": "nncf.quantize (ONNX)", "preset": "mixed", "subset_size": int(len(calibration))}
    return [
        *(Plan(f"ort-{m}", {**ort_settings, "method": m}, lambda m=m: ort(m), graph="ort-qdq") for m in methods),
        *qat_plans(job, calibration, engine, tmp, fp32_path),
        # the per-layer repair before NNCF's accuracy control: in benchmarks/export_formats.py runs here it passed
        # in 7 s at 1.74x fp32 (32 px), while NNCF's QDQ graph ran at 0.12-0.38x fp32 in ONNX Runtime after
        # 39-678 s
        Plan(
            "ort-layer-repair",
            {
                **ort_settings,
                "method": methods[0],
                "max_fp32_layers": options.max_fp32_layers,
                "ranked_on": "validation",
            },
            layer_repair,
            mixed=True,
        ),
        Plan(
            "nncf-accuracy-control",
            {
                **nncf_settings,
                "tool": "nncf.quantize_with_accuracy_control (ONNX)",
                "max_drop": "the gate's bounds on validation",
                "max_num_iterations": options.max_fp32_layers,
            },
            nncf_controlled,
            mixed=True,
        ),
    ]


def qat_plans(job: ExportJob, calibration: np.ndarray, engine: OnnxEngine, tmp: Path, fp32_path: Path) -> list[Plan]:
    """The quantization-aware attempts for onnx-int8 (export/qat.py), both from the one fine-tuning: first its
    weights through onnxruntime's own static quantization (the graph ONNX Runtime fuses, so it runs at the
    speed of ort-minmax), then NNCF's quantizers exported as a QDQ graph (the fine-tuned scales too, but a
    layout ONNX Runtime runs at a fraction of fp32: tried only if the first failed)."""
    if job.qat is None:
        return []
    from transferkit.export.onnx import export_onnx
    from transferkit.export.qat import QAT_PRESET, fine_tuned_float, to_onnx_qdq

    def through_ort(quantized: Any) -> onnx.ModelProto:
        import onnx

        from transferkit.model import ExportModule

        plain = tmp / "qat-float.onnx"
        module = ExportModule(fine_tuned_float(quantized, job.qat.model)).eval()
        export_onnx(module, job.example_input(), plain, job.head_names)
        out = tmp / "qat-ort-minmax.onnx"
        quantize_qdq(plain, out, tmp / "qat-prepared.onnx", calibration, "minmax")
        return onnx.load(str(out))

    base = {"tool": "nncf.quantize (PyTorch) + fine-tuning", "preset": QAT_PRESET, "max_steps": job.qat.steps}
    return [
        qat_plan(
            job.qat,
            calibration,
            engine,
            through_ort,
            {**base, "then": "fine-tuned weights -> onnxruntime quantize_static (QDQ, minmax)"},
            name="qat-ort-minmax",
        ),
        qat_plan(
            job.qat,
            calibration,
            engine,
            lambda model: to_onnx_qdq(model, job.head_names, job.image_size),
            {**base, "format": "QDQ", "then": "NNCF's quantizers as Q/DQ pairs"},
        ),
    ]


def quantize_onnx_int8(fp32_path: Path, path: Path, job: ExportJob) -> dict[str, Any]:
    """fp32 ONNX -> the fastest INT8 model that passes on the validation split, at `path` (atomically) ->
    manifest details, with every attempt."""
    import onnx

    if not fp32_path.is_file():
        raise TransferkitError(f"{fp32_path} is missing; onnx-int8 is built from the fp32 onnx export")
    if job.calibration is None or job.selection is None:
        raise TransferkitError("INT8 export needs calibration images and the validation split (export_run gives both)")
    calibration = job.calibration(job.options.calibration_images)
    engine = OnnxEngine(job.head_names)
    with tempfile.TemporaryDirectory(prefix="transferkit-int8-") as tmp:
        plans = onnx_int8_plans(fp32_path, Path(tmp), job, calibration, engine)
        fp32 = onnx.load(str(fp32_path))
        result = search(plans, engine, job.selection, job.options, fp32_model=fp32, clock=job.int8_clock)
        if result.chosen is None:
            raise TransferkitError(
                "every INT8 attempt failed: "
                + "; ".join(f"{a['name']}: {a.get('error', a['status'])}" for a in result.attempts)
            )
        atomic_write(path, lambda out: onnx.save(result.chosen.model, str(out)))
    return int8_details(fp32_path.name, result, calibration, job.selection, job.options)


def quantize_for_tensorrt(fp32_path: Path, out_path: Path, job: ExportJob) -> dict[str, Any]:
    """The QDQ model a TensorRT INT8 engine is built from: symmetric int8 activations, same calibration images
    and method as onnx-int8. The engine is gated by verify like every artifact (no per-layer repair there)."""
    if job.calibration is None:
        raise TransferkitError("INT8 export needs calibration images (export_run gives them)")
    calibration = job.calibration(job.options.calibration_images)
    with tempfile.TemporaryDirectory(prefix="transferkit-int8-") as tmp:
        quantize_qdq(
            fp32_path,
            out_path,
            Path(tmp) / "prepared.onnx",
            calibration,
            job.options.calibration_method,
            symmetric=True,
        )
    return {
        "tool": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activations": "int8 symmetric",
        "weights": "int8 per channel",
        "method": job.options.calibration_method,
        "calibration_images": int(len(calibration)),
    }
