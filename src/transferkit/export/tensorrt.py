"""TensorRT engine, built from model.onnx with TensorRT's own builder API (no trtexec, no torch-tensorrt).

    ONNX --OnnxParser--> INetworkDefinition --Builder + BuilderConfig(profile, fp16)--> model.engine
    INT8: a QDQ ONNX file with symmetric int8 activations (TensorRT takes zero points of 0 only) -> a strongly
    typed network, where the Q/DQ nodes decide what runs in INT8 (explicit quantization)

An engine is specific to the GPU model and TensorRT version it was built with, so the manifest records both,
and serving refuses an engine built for another GPU. Needs the [gpu] extra (`tensorrt`) and a CUDA device;
elsewhere the format reports "not available here" with the reason, and nothing is faked.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from transferkit.artifact import INPUT_NAME
from transferkit.errors import TransferkitError
from transferkit.utils import atomic_write

WORKSPACE_BYTES = 2 << 30  # builder scratch memory; tactics that need more are skipped, not failed

INSTALL_HINT = "install the [gpu] extra on a CUDA machine: pip install 'transferkit[gpu]'"


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else one line saying why not and what to do."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"tensorrt is not installed; {INSTALL_HINT}"
    try:
        import tensorrt  # noqa: F401  (a broken install fails here, not halfway through a build)
    except Exception as exc:  # noqa: BLE001
        return f"tensorrt does not import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    try:
        import torch

        if not torch.cuda.is_available():
            return f"no CUDA device visible; {INSTALL_HINT}"
    except ImportError:
        return "torch is needed to allocate CUDA buffers for the engine"
    return None


def gpu_identity() -> dict[str, Any]:
    """The GPU an engine is built for / run on: model name and compute capability."""
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def build_engine(
    onnx_path: Path, path: Path, precision: str, image_size: int, batch_range: tuple[int, int, int]
) -> dict[str, Any]:
    """model.onnx -> the engine at `path`, with a (min, opt, max) `batch_range` profile; fp16 when asked;
    for int8, `onnx_path` is a QDQ model (explicit quantization)."""
    import tensorrt as trt

    if not onnx_path.is_file():
        raise TransferkitError(f"{onnx_path} is missing; the tensorrt format is built from the onnx export")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it set.
    flags = 0 if _major(trt.__version__) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if precision == "int8":
        # Explicit quantization: the Q/DQ nodes of the ONNX file say what runs in INT8. TensorRT asks for a
        # strongly typed network and no precision flags in that mode (its "Explicit Quantization" guide).
        if _major(trt.__version__) < 10:
            raise TransferkitError("INT8 engines from a QDQ model need TensorRT 10 (strongly typed networks)")
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TransferkitError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in TensorRT 10
            raise TransferkitError("this GPU has no fast fp16; export with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)
    min_batch, opt_batch, max_batch = batch_range
    shape = (3, image_size, image_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TransferkitError("TensorRT failed to build the engine (see the TensorRT log above)")
    atomic_write(path, lambda tmp: tmp.write_bytes(bytes(serialized)))
    return {
        "tensorrt_version": trt.__version__,
        "built_for_gpu": gpu_identity(),
        "profile": {"input": INPUT_NAME, "min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch},
        "precision": precision,
        "built_from": onnx_path.name,
    }


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0
