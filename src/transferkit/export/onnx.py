"""ONNX export: one self-contained `model.onnx` with input `images` (N,3,S,S) and one output per head.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`, built on torch.export) is the standard path.
Only if it fails do we fall back to the TorchScript exporter, and the manifest records which one ran, so a
fallback is never silent. Weights are embedded (`external_data=False`): one file is easier to hash, copy and
serve; ONNX's protobuf limit makes that work up to 2 GB, far above the backbones used here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.artifact import INPUT_NAME
from transferkit.errors import TransferkitError, one_line
from transferkit.utils import atomic_write

if TYPE_CHECKING:
    import torch

OPSET = 18  # >= 17 for LayerNormalization; 18 is the dynamo exporter's native opset and TensorRT 10 parses it
BATCH_DIM = "batch"


def onnx_unavailable_reason() -> str | None:
    """None when the ONNX export can run and be verified here, else which packages are missing."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"missing Python package(s) {missing}: pip install onnx onnxscript onnxruntime"
    return None


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, head_names: list[str]) -> dict[str, Any]:
    """Write `path` atomically from `model` traced on `example` (N,3,S,S); -> details for the manifest."""
    import torch

    inputs = (example,)
    details: dict[str, Any] = {"opset": OPSET, "input": INPUT_NAME, "outputs": list(head_names)}
    try:
        program = torch.onnx.export(
            model,
            inputs,
            f=None,
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=list(head_names),
            opset_version=OPSET,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim(BATCH_DIM)}},
            verbose=False,
        )
        atomic_write(path, lambda tmp: program.save(str(tmp), external_data=False))
        details["exporter"] = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure triggers the recorded fallback
        details["exporter"] = "torchscript"
        details["dynamo_error"] = one_line(exc)
        atomic_write(
            path,
            lambda tmp: torch.onnx.export(
                model,
                inputs,
                str(tmp),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(head_names),
                opset_version=OPSET,
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, **{h: {0: BATCH_DIM} for h in head_names}},
            ),
        )
    check_onnx(path, head_names, int(example.shape[-1]))
    return details


def check_onnx(path: Path, head_names: list[str], image_size: int) -> None:
    """onnx.checker plus the contract serving relies on: names, opset, dynamic batch, input shape."""
    import onnx

    try:
        onnx.checker.check_model(str(path))  # path form: also works for models near the 2 GB limit
    except onnx.checker.ValidationError as exc:
        raise TransferkitError(f"{path}: onnx.checker rejected the model: {one_line(exc)}") from None
    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 17:
        raise TransferkitError(f"{path}: opset {opset} < 17")
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != list(head_names):
        raise TransferkitError(f"{path}: inputs {inputs} / outputs {outputs}; expected [{INPUT_NAME}] / {head_names}")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(shape) != 4 or not isinstance(shape[0], str) or shape[1:] != [3, image_size, image_size]:
        raise TransferkitError(f"{path}: input shape {shape}; expected [batch, 3, {image_size}, {image_size}]")


def export_onnx_fp16(
    model: torch.nn.Module, example: torch.Tensor, path: Path, head_names: list[str]
) -> dict[str, Any]:
    """fp16 weights and activations with fp32 `images` in and fp32 logits out: the cast is part of the graph,
    so clients, the service and the runtimes see the same contract as fp32. Exported from a half-precision copy
    of the model by the same exporter as fp32 (no graph rewriting after the fact)."""
    import copy

    import torch

    class Fp16WithFp32IO(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = copy.deepcopy(inner).half().eval()

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(out.float() for out in self.inner(images.half()))

    details = export_onnx(Fp16WithFp32IO(model).eval(), example, path, head_names)
    details["precision"] = "fp16"
    details["io_dtype"] = "float32"
    return details


def simplify_onnx(path: Path, head_names: list[str], image_size: int) -> dict[str, Any]:
    """onnxslim the file in place (atomically), re-checked against the contract -> node counts before/after."""
    import onnx

    try:
        import onnxslim
    except ImportError:
        raise TransferkitError("--simplify needs onnxslim: pip install onnxslim") from None
    before = onnx.load(str(path))
    slim = onnxslim.slim(before)
    atomic_write(path, lambda tmp: onnx.save(slim, str(tmp)))
    check_onnx(path, head_names, image_size)
    return {
        "tool": f"onnxslim {getattr(onnxslim, '__version__', '')}".strip(),
        "nodes_before": len(before.graph.node),
        "nodes_after": len(slim.graph.node),
    }
