"""AOTInductor: torch.export -> `torch._inductor.aoti_compile_and_package` -> model.pt2.

A .pt2 package is compiled C++/Triton code for one device type (the export `device`): a CPU package runs on
CPU, a CUDA package on CUDA. It is loaded with `torch._inductor.aoti_load_package`, so it needs torch at
serving time (the lean ONNX serving image does not have it). Compiling needs a C++ compiler; on a 2-core CPU
it takes about a minute for mobilenet_v2.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.artifact import INPUT_NAME, check_device

if TYPE_CHECKING:
    import torch


def aoti_unavailable_reason(device: str) -> str | None:
    try:
        import torch
        import torch._inductor
    except ImportError:
        return "torch is not installed"
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package; use torch >= 2.6"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not compiler:
        return "AOTInductor needs a C++ compiler (g++ or clang++) on PATH; e.g. apt-get install g++"
    if check_device(device) == "gpu" and not torch.cuda.is_available():
        return f"device {device} was asked for but no CUDA device is visible"
    return None


def export_aoti(
    model: torch.nn.Module, example: torch.Tensor, path: Path, device: str, batch_range: tuple[int, int]
) -> dict[str, Any]:
    """Compile `model` for `device` with a dynamic batch in `batch_range` (min, max) into the .pt2 `path`."""
    import torch

    target = torch.device(device)
    min_batch, max_batch = batch_range
    model.to(target)
    try:
        inputs = (example.to(target),)
        batch = torch.export.Dim("batch", min=min_batch, max=max_batch)
        with torch.inference_mode(False):
            program = torch.export.export(model, inputs, dynamic_shapes={INPUT_NAME: {0: batch}})
        # aoti_compile_and_package insists on a `.pt2` name, so the atomic temp file keeps that suffix.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.pt2", dir=path.parent)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    finally:
        model.to("cpu")  # the next exporter and the PyTorch reference expect CPU weights
    return {
        "device": "cuda" if target.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "batch_range": [min_batch, max_batch],
    }
