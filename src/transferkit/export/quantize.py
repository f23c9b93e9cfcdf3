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
from collections.abc import Callable
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
from transferkit.utils import atomic_write

if TYPE_CHECKING:
    import onnx

    from transferkit.export.job import ExportJob

CALIBRATION_BATCH = 32
SENSITIVITY_IMAGES = 128  # per measurement of one layer: enough to rank layers, small enough for ~60 of them
# Layers whose inputs the quantizer puts behind DequantizeLinear and that can be kept in fp32 one by one.
ACTIVATIONS = ("Clip", "Relu")  # kept in the graph by QDQKeepRemovableActivations; follow their layer into fp32
REPAIRABLE_OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "ConvTranspose", "AveragePool", "GlobalAveragePool")


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


def repairable_layers(qdq: onnx.ModelProto) -> list[str]:
    """Quantized layers, in graph order: nodes of REPAIRABLE_OPS with at least one input from DequantizeLinear."""
    dq_outputs = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in qdq.graph.node if n.op_type in REPAIRABLE_OPS and any(i in dq_outputs for i in n.input)]


def keep_in_fp32(qdq: onnx.ModelProto, fp32: onnx.ModelProto, layers: list[str]) -> onnx.ModelProto:
    """A copy of the QDQ model where `layers` run in fp32: each reads the inputs it has in the fp32 model (the
    fp32 tensors and weights its Q/DQ pairs stood for); Q/DQ nodes and initializers left unread are removed."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    fp32_inits = {t.name: t for t in fp32.graph.initializer}
    # a name some node already produces (the quantizer keeps a bias's name for its int32 DequantizeLinear) is
    # read from there: redefining it as an initializer would make the graph invalid
    have_inits = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    # a layer's activation (Clip, Relu) goes with it: a conv kept in fp32 feeds its ReLU6 unquantized
    kept = set(layers)
    for name in layers:
        outputs = set(fp32_nodes[name].output) if name in fp32_nodes else set()
        kept |= {n.name for n in fp32.graph.node if n.op_type in ACTIVATIONS and n.input and n.input[0] in outputs}
    for node in model.graph.node:
        if node.name not in kept:
            continue
        original = fp32_nodes.get(node.name)
        if original is None or len(original.input) != len(node.input):
            raise TransferkitError(f"layer {node.name} has no fp32 counterpart; cannot keep it in fp32")
        del node.input[:]
        node.input.extend(original.input)
        for name in original.input:
            if name in fp32_inits and name not in have_inits:
                model.graph.initializer.append(fp32_inits[name])
                have_inits.add(name)
    _prune(model)
    return model


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly: a dead DQ makes its Q dead) and unread initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {i for n in graph.node for i in n.input}
    for init in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(init)


def _logits(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    from transferkit.serving.runtime import onnx_session

    session = onnx_session(model.SerializeToString())
    outs = [session.run(None, {INPUT_NAME: images[i : i + 64]}) for i in range(0, len(images), 64)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def _distance(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """How far quantized logits are from fp32: squared error relative to the logits' own spread, over heads."""
    return float(sum(np.mean((g - r) ** 2) / (np.var(r) + 1e-12) for r, g in zip(reference, got)))


def rank_layers(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, images: np.ndarray, check: Callable[[], None] = lambda: None
) -> list[tuple[str, float]]:
    """Each quantized layer with the fraction of the output error that keeping it alone in fp32 removes,
    largest first (per-layer sensitivity, measured end to end on `images`). `check` runs before each layer's
    session (the INT8 budget: one session per layer is the repair's slow part at 224 px)."""
    reference = _logits(fp32, images)
    base = _distance(reference, _logits(qdq, images))
    scores = []
    for layer in repairable_layers(qdq):
        check()
        error = _distance(reference, _logits(keep_in_fp32(qdq, fp32, [layer]), images))
        scores.append((layer, (base - error) / base if base > 0 else 0.0))
    return sorted(scores, key=lambda s: -s[1])


def module_names(model: onnx.ModelProto) -> dict[str, str]:
    """ONNX node name -> the PyTorch module it came from (the exporter's name scopes, `backbone.features.0.1`),
    so the repair's log names layers the way the model's code does."""
    import ast

    out = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        try:
            names = [n for n in ast.literal_eval(scopes) if n and not n.startswith("_")] if scopes else []
        except (ValueError, SyntaxError):
            names = []
        if names:
            out[node.name] = names[-1].removeprefix("model.")
    return out


def _budget_steps(budget: int) -> list[int]:
    """1, 2, 4, ... layers, ending exactly at the budget."""
    steps, k = [], 1
    while k < budget:
        steps.append(k)
        k *= 2
    return steps + [budget] if budget else []


class OnnxEngine(Engine):
    """Runs candidate ModelProtos in ONNX Runtime as served (all optimisations, CPU), one session per model."""

    def __init__(self, heads: list[str]) -> None:
        super().__init__(self._logits)
        self.heads = heads
        self._cache: tuple[Any, Any] | None = None  # (model, session): the model held, so its id stays unique

    def _logits(self, model: onnx.ModelProto, images: np.ndarray) -> dict[str, np.ndarray]:
        from transferkit.serving.runtime import onnx_session

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


def repair_layers(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, fp32_path: Path, job: ExportJob, engine: OnnxEngine
) -> Candidate:
    """The per-layer repair of a QDQ model: rank layers by how much keeping each alone in fp32 brings the logits
    back (on validation images), then keep the worst 1, 2, 4, ... (up to --max-fp32-layers) in fp32 until the
    validation split passes. Each step is one graph edit, not a new calibration."""
    import onnx

    selection, budget = job.selection, job.options.max_fp32_layers
    sample = selection.inputs.batch[
        np.random.default_rng(0).permutation(len(selection.inputs.batch))[:SENSITIVITY_IMAGES]
    ]
    ranking = rank_layers(qdq, fp32, sample, engine.check_deadline)
    modules = module_names(onnx.load(str(fp32_path)))
    named = lambda layers: [f"{n} ({modules[n]})" if n in modules else n for n in layers]  # noqa: E731
    model, layers, steps = qdq, [], []
    for k in _budget_steps(min(budget, len(ranking))):
        engine.check_deadline()
        layers = [n for n, _ in ranking[:k]]
        model = keep_in_fp32(qdq, fp32, layers)
        passed = selection.report(engine.logits(model, selection.inputs.batch))["passed"]
        steps.append({"fp32_layers": k, "passed_on_validation": passed})
        if passed:
            break
    sensitivity = [{"layer": n, "module": modules.get(n, ""), "error_removed": round(s, 4)} for n, s in ranking[:16]]
    return Candidate(model, named(layers), {"steps": steps, "sensitivity": sensitivity})


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
