"""INT8 ONNX: ONNX Runtime static quantization in QDQ form, gated, and repaired when the gate rejects it.

    model.onnx (fp32) --quant_pre_process--> --quantize_static(QDQ, per-channel int8 weights, uint8
    activations, calibrated on train images of every dataset)--> model-int8.onnx
        gate (verify against PyTorch fp32 on held-out images)   passed -> done
        failed and --int8-fallback auto:
            rank the quantized layers by how much keeping each one alone in fp32 brings the logits back
            keep the worst 1, 2, 4, ... (up to --max-fp32-layers) in fp32 and gate again, until it passes

Static INT8 of depthwise-separable networks can lose several points on one dataset with no error raised (a
MobileNetV2 fine-tuned on MNIST + Fashion-MNIST loses 3 points on Fashion-MNIST with every calibration method),
which is why every INT8 file is gated and why the repair exists. Keeping a layer in fp32 is a graph edit on the
quantized model: the layer reads the fp32 tensors and weights its Q/DQ pair stood for, and Q/DQ nodes nobody reads
any more are dropped. Every other layer keeps the scales calibration gave it, so each step costs one gate, not a
new calibration. The same QDQ file is what TensorRT's explicit quantization consumes (export/tensorrt.py).

`job.calibration(n)` gives the calibration images and `job.gate(path, precision)` the verify report; export/
pipeline.py provides both. Details (method, images, the layers kept in fp32, accuracy at each step) go into the
manifest entry and, through it, verify.json.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.artifact import INPUT_NAME
from transferkit.errors import TransferkitError
from transferkit.utils import atomic_write

if TYPE_CHECKING:
    import onnx

    from transferkit.export.formats import ExportJob

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
FALLBACKS = ("auto", "off")
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


def quantize_qdq(fp32_path: Path, out_path: Path, prepared: Path, calibration: np.ndarray, method: str,
                 symmetric: bool = False) -> None:  # fmt: skip
    """Static QDQ quantization: per-channel int8 weights, uint8 (or, `symmetric`, int8) activations calibrated
    on `calibration`.
    `prepared` receives the fp32 model as quantized (after onnxruntime's pre-processing): the graph whose node
    names and tensors the QDQ model shares."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    # shape inference + constant folding, as onnxruntime recommends before quantizing
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
    # Clip/Relu stay in the graph (by default the quantizer drops them and lets the Q node's range clip): a layer
    # kept in fp32 then reads the clipped tensor, as in the fp32 model. ORT still fuses them when it loads.
    # `symmetric`: int8 activations with zero points of 0, what TensorRT's explicit quantization accepts (ONNX
    # Runtime on x86 is faster with the default uint8 activations).
    quantize_static(str(prepared), str(out_path), _Reader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                    calibrate_method=methods[method],
                    extra_options={"QDQKeepRemovableActivations": True, "ActivationSymmetric": symmetric})  # fmt: skip


def repairable_layers(qdq: "onnx.ModelProto") -> list[str]:
    """Quantized layers, in graph order: nodes of REPAIRABLE_OPS with at least one input from DequantizeLinear."""
    dq_outputs = {o for n in qdq.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in qdq.graph.node if n.op_type in REPAIRABLE_OPS and any(i in dq_outputs for i in n.input)]


def keep_in_fp32(qdq: "onnx.ModelProto", fp32: "onnx.ModelProto", layers: list[str]) -> "onnx.ModelProto":
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


def _prune(model: "onnx.ModelProto") -> None:
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


def _session(model: "onnx.ModelProto"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as served: QDQ fusions on
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def _logits(model: "onnx.ModelProto", images: np.ndarray) -> list[np.ndarray]:
    session = _session(model)
    outs = [session.run(None, {INPUT_NAME: images[i : i + 64]}) for i in range(0, len(images), 64)]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


def _distance(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """How far quantized logits are from fp32: squared error relative to the logits' own spread, over heads."""
    return float(sum(np.mean((g - r) ** 2) / (np.var(r) + 1e-12) for r, g in zip(reference, got)))


def rank_layers(qdq: "onnx.ModelProto", fp32: "onnx.ModelProto", images: np.ndarray) -> list[tuple[str, float]]:
    """Each quantized layer with the fraction of the output error that keeping it alone in fp32 removes,
    largest first (per-layer sensitivity, measured end to end on `images`)."""
    reference = _logits(fp32, images)
    base = _distance(reference, _logits(qdq, images))
    scores = []
    for layer in repairable_layers(qdq):
        error = _distance(reference, _logits(keep_in_fp32(qdq, fp32, [layer]), images))
        scores.append((layer, (base - error) / base if base > 0 else 0.0))
    return sorted(scores, key=lambda s: -s[1])


def module_names(model: "onnx.ModelProto") -> dict[str, str]:
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


def _step(report: dict[str, Any], layers: list[str]) -> dict[str, Any]:
    """One line of the repair's log: which layers were fp32 and what the gate measured."""
    per_dataset = {ds: round(v["accuracy_format"], 5) for h in report.get("heads", {}).values()
                   for ds, v in h.get("per_dataset", {}).items()}  # fmt: skip
    agreement = {h: round(v["top1_agreement"], 5) for h, v in report.get("heads", {}).items()}
    return {"fp32_layers": list(layers), "passed": bool(report.get("passed")), "accuracy": per_dataset,
            "top1_agreement": agreement, "failures": report.get("failures", [])}  # fmt: skip


def _budget_steps(budget: int) -> list[int]:
    """1, 2, 4, ... layers, ending exactly at the budget."""
    steps, k = [], 1
    while k < budget:
        steps.append(k)
        k *= 2
    return steps + [budget] if budget else []


def quantize_int8(fp32_path: Path, path: Path, job: "ExportJob") -> dict[str, Any]:
    """fp32 ONNX -> the INT8 QDQ model at `path` (atomically), repaired if the gate rejects it -> details."""
    import onnx

    if not fp32_path.is_file():
        raise TransferkitError(f"{fp32_path} is missing; onnx-int8 is built from the fp32 onnx export")
    if job.calibration is None or job.gate is None:
        raise TransferkitError("INT8 export needs calibration images and the verify gate (export_run gives both)")
    options = job.options
    calibration = job.calibration(options.calibration_images)
    details: dict[str, Any] = {
        "built_from": fp32_path.name,
        "quantization": {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
                         "weights": "int8", "activations": "uint8", "method": options.calibration_method,
                         "calibration_images": int(len(calibration)),
                         "calibration_images_per_dataset": options.calibration_images},  # fmt: skip
    }
    with tempfile.TemporaryDirectory(prefix="transferkit-int8-") as tmp:
        first, prepared = Path(tmp) / "int8.onnx", Path(tmp) / "prepared.onnx"
        quantize_qdq(fp32_path, first, prepared, calibration, options.calibration_method)
        qdq, fp32 = onnx.load(str(first)), onnx.load(str(prepared))
        model, layers, modules = qdq, [], {}
        report = _gate(job, model, Path(tmp) / "check.onnx")
        steps = [_step(report, [])]
        if not report["passed"] and options.int8_fallback == "auto" and options.max_fp32_layers > 0:
            sample = calibration[np.random.default_rng(0).permutation(len(calibration))[:SENSITIVITY_IMAGES]]
            ranking = rank_layers(qdq, fp32, sample)
            modules = module_names(onnx.load(str(fp32_path)))
            details["sensitivity"] = [{"layer": n, "module": modules.get(n, ""), "error_removed": round(s, 4)}
                                      for n, s in ranking[:16]]  # fmt: skip
            for k in _budget_steps(min(options.max_fp32_layers, len(ranking))):
                layers = [n for n, _ in ranking[:k]]
                model = keep_in_fp32(qdq, fp32, layers)
                report = _gate(job, model, Path(tmp) / "check.onnx")
                steps.append(_step(report, layers))
                if report["passed"]:
                    break
        atomic_write(path, lambda out: onnx.save(model, str(out)))
    named = [f"{n} ({modules[n]})" if n in modules else n for n in layers] if layers else []
    details["repair"] = {"fallback": options.int8_fallback, "max_fp32_layers": options.max_fp32_layers,
                         "fp32_layers": named, "steps": steps, "passed": steps[-1]["passed"]}  # fmt: skip
    return details


def _gate(job: "ExportJob", model: "onnx.ModelProto", scratch: Path) -> dict[str, Any]:
    import onnx

    onnx.save(model, str(scratch))
    return job.gate(scratch, "int8")


def quantize_for_tensorrt(fp32_path: Path, out_path: Path, job: "ExportJob") -> dict[str, Any]:
    """The QDQ model a TensorRT INT8 engine is built from: symmetric int8 activations, same calibration images
    and method as onnx-int8. The engine is gated by verify like every artifact (no per-layer repair there)."""
    if job.calibration is None:
        raise TransferkitError("INT8 export needs calibration images (export_run gives them)")
    calibration = job.calibration(job.options.calibration_images)
    with tempfile.TemporaryDirectory(prefix="transferkit-int8-") as tmp:
        quantize_qdq(fp32_path, out_path, Path(tmp) / "prepared.onnx", calibration, job.options.calibration_method,
                     symmetric=True)  # fmt: skip
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "activations": "int8 symmetric",
            "weights": "int8 per channel", "method": job.options.calibration_method,
            "calibration_images": int(len(calibration))}  # fmt: skip
