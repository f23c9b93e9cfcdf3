"""The per-layer repair of a QDQ ONNX model, onnx-int8's own mixed-precision attempt (export/quantize.py).

    rank: keep each quantized layer alone in fp32 and measure how much of the logit error that removes, end to
          end on SENSITIVITY_IMAGES validation images (one ONNX Runtime session per layer)
    keep the worst 1, 2, 4, ... (up to --max-fp32-layers) in fp32 until the validation split passes

Keeping a layer in fp32 is a graph edit on the quantized model: the layer reads the fp32 tensors and weights its
Q/DQ pair stood for, and Q/DQ nodes nobody reads any more are dropped, so every other layer keeps the scales
calibration gave it and each step costs one validation, not a new calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit.artifact import INPUT_NAME
from transferkit.errors import TransferkitError
from transferkit.export.int8 import Candidate, Engine

if TYPE_CHECKING:
    import onnx

    from transferkit.export.job import ExportJob

SENSITIVITY_IMAGES = 128  # per measurement of one layer: enough to rank layers, small enough for ~60 of them
# Layers whose inputs the quantizer puts behind DequantizeLinear and that can be kept in fp32 one by one.
ACTIVATIONS = ("Clip", "Relu")  # kept in the graph by QDQKeepRemovableActivations; follow their layer into fp32
REPAIRABLE_OPS = ("Conv", "Gemm", "MatMul", "Add", "Mul", "ConvTranspose", "AveragePool", "GlobalAveragePool")


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
    from transferkit.runtimes.runtime import onnx_session

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


def repair_layers(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, fp32_path: Path, job: ExportJob, engine: Engine
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
