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
from typing import Any

from transferkit.export.formats import FORMATS, MAX_BATCH, MIN_BATCH, ExportJob
from transferkit.export.onnx import INPUT_NAME


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
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"device {device} was asked for but no CUDA device is visible"
    return None


def export_aoti(job: ExportJob) -> dict[str, Any]:
    import torch

    device = torch.device(job.device)
    model = job.model.to(device)
    try:
        example = (job.example_input().to(device),)
        batch = torch.export.Dim("batch", min=MIN_BATCH, max=MAX_BATCH)
        with torch.inference_mode(False):
            program = torch.export.export(model, example, dynamic_shapes={INPUT_NAME: {0: batch}})
        path = job.export_dir / FORMATS["aoti"].filename
        # aoti_compile_and_package insists on a `.pt2` name, so the atomic temp file keeps that suffix.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.pt2", dir=path.parent)
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    finally:
        job.model.to("cpu")  # the next exporter and the PyTorch reference expect CPU weights
    return {
        "device": "cuda" if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "batch_range": [MIN_BATCH, MAX_BATCH],
    }
