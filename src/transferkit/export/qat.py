"""Quantization-aware INT8: NNCF's fake quantizers in the run's PyTorch model, fine-tuned, then exported to both
INT8 formats. The second rung of the INT8 search's escalation (export/int8.py):

    post-training fully INT8  ->  quantization-aware fully INT8  ->  mixed precision (layers kept in fp32)

    model.pt --nncf.quantize(torch, calibration images)--> quantizers in the forward pass
             --training/qat.py: finetune(the run's train splits, heads, sampler, augmentation)-->
             --openvino.convert_model--------------------------> IR with FakeQuantize   (openvino-int8 attempt)
             --the fine-tuned weights, fp32 ONNX, onnxruntime static INT8 (minmax)-->  (onnx-int8 attempt)
             --torch.onnx.export, quantizers as Q/DQ pairs------> QDQ ONNX              (onnx-int8 attempt, after
                                                                  it: NNCF's layout, which ONNX Runtime runs
                                                                  slowly, but the QDQ form TensorRT reads)

The fine-tuning runs once per export (`QuantizationAware.trained`, shared by both formats' searches) and only
when a search reaches it, that is when no post-training attempt passed on validation (`--qat auto`), or first
(`--qat always`, for users who want the INT8 model as a training product). Its steps, seconds, learning rate and
loss go into each attempt's record, and so into verify.json and the manifest.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.artifact import INPUT_NAME
from transferkit.errors import TransferkitError
from transferkit.export.job import BudgetSpent

if TYPE_CHECKING:
    import onnx
    import torch

    from transferkit.runs import Run

QAT_PRESET = "mixed"  # symmetric weights, asymmetric activations: the post-training attempts' scheme
QAT_OPSET = 17
QAT_CALIBRATION_IMAGES = 256  # initial ranges only: fine-tuning moves them


@dataclass
class QuantizationAware:
    """The run's model fine-tuned with quantizers, made on first use and shared by the onnx-int8 and openvino-int8
    searches of one export. `check` is the calling search's deadline, consulted at every training step."""

    run: Run
    model: torch.nn.Module  # the run's MultiHeadModel, fp32, eval (not modified)
    sources: list[str]  # the run's datasets where they are on this machine
    steps: int
    _trained: tuple[torch.nn.Module, dict[str, Any]] | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)
    _skipped: str | None = field(default=None, repr=False)  # why it did not train (too few steps fit the budget)

    def trained(
        self, calibration: np.ndarray, check: Callable[[], None], budget_s: float
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        """(the fine-tuned quantized MultiHeadModel in eval mode, what was done), training for at most `steps`
        steps and `budget_s` seconds on first use; raises the first attempt's error again rather than training
        twice. Training too short to help (QatWontFit) is a skip, BudgetSpent, for every search of the export:
        a later search has less of the budget, not more."""
        from transferkit.training.qat import QatWontFit

        if self._skipped is not None:
            raise BudgetSpent(self._skipped)
        if self._error is not None:
            raise TransferkitError(self._error)
        if self._trained is None:
            try:
                self._trained = self._train(calibration, check, budget_s)
            except QatWontFit as exc:
                self._skipped = f"skipped: {exc}"
                raise BudgetSpent(self._skipped) from None
            except Exception as exc:
                if not isinstance(exc, BudgetSpent):  # the next search has a budget of its own
                    self._error = f"quantization-aware training failed: {exc}"
                raise
        return self._trained

    def _train(
        self, calibration: np.ndarray, check: Callable[[], None], budget_s: float
    ) -> tuple[torch.nn.Module, dict[str, Any]]:
        import nncf
        import torch

        from transferkit.training.qat import finetune, qat_setup

        start = time.perf_counter()
        model = copy.deepcopy(self.model).eval()
        # batches, not single images: NNCF's PyTorch statistics run the model once per item, and the ranges are
        # learned during fine-tuning anyway (per-image items took 90 s for 512 images at 32 px)
        images = calibration[:QAT_CALIBRATION_IMAGES]
        batches = [torch.from_numpy(images[i : i + 32]) for i in range(0, len(images), 32)]
        quantized = nncf.quantize(
            model, nncf.Dataset(batches), preset=nncf.QuantizationPreset(QAT_PRESET), subset_size=len(batches)
        )
        calibrated_s = time.perf_counter() - start
        check()
        setup = qat_setup(self.run.config, self.sources, self.run.labels.heads)
        report = finetune(quantized, setup, self.steps, budget_s - (time.perf_counter() - start), check)
        record = {
            "tool": "nncf.quantize (PyTorch) + quantization-aware fine-tuning",
            "nncf": nncf.__version__,
            "preset": QAT_PRESET,
            "calibration_images": int(len(images)),
            "calibration_seconds": round(calibrated_s, 1),
            "training": report.as_dict(),
            "trained_on": "train split of " + ", ".join(self.run.labels.datasets),
        }
        return quantized, record


def export_module(quantized: torch.nn.Module) -> torch.nn.Module:
    from transferkit.model import ExportModule

    return ExportModule(quantized).eval()


def fine_tuned_float(quantized: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """The run's fp32 model with the weights quantization-aware training left (its quantizers' own parameters
    dropped): weights adapted to INT8 rounding, for a post-training quantizer whose graph its runtime fuses
    (ONNX Runtime runs NNCF's QDQ layout at a fraction of fp32: BatchNorm stays unfolded behind the weights' Q/DQ)."""
    plain = copy.deepcopy(model).eval()
    weights = quantized.state_dict()
    plain.load_state_dict({k: weights[k] for k in plain.state_dict()})
    return plain


def to_onnx_qdq(quantized: torch.nn.Module, heads: list[str], image_size: int) -> onnx.ModelProto:
    """The fine-tuned model as a QDQ ONNX model: NNCF's quantizers exported as QuantizeLinear/DequantizeLinear
    pairs (TorchScript exporter: NNCF's quantizers export through their symbolic functions)."""
    import onnx
    import torch
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    module = copy.deepcopy(export_module(quantized))
    quantizers = [m for m in module.modules() if isinstance(m, BaseQuantizer)]
    if not quantizers:
        raise TransferkitError("the quantization-aware model has no quantizers to export")
    for q in quantizers:
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    with tempfile.TemporaryDirectory(prefix="transferkit-qat-") as tmp:
        path = Path(tmp) / "qat.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.zeros(2, 3, image_size, image_size),),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=list(heads),
                opset_version=QAT_OPSET,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{h: {0: "batch"} for h in heads}},
            )
        model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    if "QuantizeLinear" not in ops or "DequantizeLinear" not in ops:
        raise TransferkitError("the quantization-aware ONNX export has no Q/DQ pairs")
    return model
