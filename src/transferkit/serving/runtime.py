"""Runtimes: one interface over the engines that run an exported model.

    runtime = load_runtime("auto", export_dir, manifest)
    logits = runtime.run(batch)          # float32 (N,3,S,S), normalized -> {head: float32 (N, classes)}

    name         format    file          needs
    tensorrt     tensorrt  model.engine  tensorrt + CUDA (+ torch for device buffers); the GPU it was built for
    onnxruntime  onnx      model.onnx    onnxruntime (CPU) or onnxruntime-gpu (CUDA provider, used when present)
    torch        aoti      model.pt2     torch (a CUDA package also needs CUDA)

Each runner names the format it runs; its --runtime name, file and devices come from that format's row in
`transferkit.artifact.FORMAT_SPECS`, and a row without a runner fails here at import. `auto` picks the fastest
usable one: artifacts that run on a GPU here first, then by the row's `auto_rank` (tensorrt > onnxruntime-gpu >
torch on CUDA > onnxruntime on CPU > torch on CPU), and never a format whose verification failed. This module
imports nothing heavy at import time: the lean serving image has no torch, and only the runtime that is used
imports its engine.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from transferkit.artifact import FORMAT_SPECS, INPUT_NAME, MAX_BATCH, MIN_BATCH, RUNTIME_NAMES, spec_for_runtime
from transferkit.errors import ConfigError, TransferkitError


class Runtime(ABC):
    format: ClassVar[str]  # the export format (FORMAT_SPECS / manifest["formats"] key) it loads
    name: ClassVar[str]  # what --runtime takes: the row's `runtime`

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.image_size = 0
        self.max_batch: int | None = None  # larger batches are split into chunks of this size
        self.threads: int | None = None  # intra-op threads (None: the engine's default, usually every core)

    @classmethod
    def unavailable_reason(cls, manifest: dict[str, Any]) -> str | None:
        """None if this runtime can run the manifest's artifact on this machine, else why not."""
        return None

    @classmethod
    def device_kind(cls, manifest: dict[str, Any]) -> str:
        """Where this runtime would run the export's artifact here, "gpu" or "cpu": `auto` tries GPU ones first."""
        devices = FORMAT_SPECS[cls.format].devices
        return devices[0] if len(devices) == 1 else "cpu"

    def load(self, export_dir: str | Path, manifest: dict[str, Any]) -> "Runtime":
        entry = manifest["formats"][self.format]
        path = Path(export_dir) / entry["file"]
        if not path.is_file():
            raise TransferkitError(f"{path} not found; re-run `transferkit export RUN --format {self.format}`")
        self.heads = [o["name"] for o in manifest["outputs"]]
        self.image_size = int(manifest["preprocessing"]["image_size"])
        self._load(path, entry)
        return self

    @abstractmethod
    def _load(self, path: Path, entry: dict[str, Any]) -> None: ...

    @abstractmethod
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    @property
    def description(self) -> str:
        return self.name

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N,3,S,S) normalized images -> {head: float32 logits (N, classes)}."""
        s = self.image_size
        if batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[1:] != (3, s, s) or len(batch) == 0:
            raise ValueError(f"expected a float32 batch (N,3,{s},{s}) with N >= 1, got {batch.dtype} {batch.shape}")
        batch = np.ascontiguousarray(batch)
        step = self.max_batch or len(batch)
        parts = [self._run(batch[i : i + step]) for i in range(0, len(batch), step)]
        return {h: np.concatenate([p[h] for p in parts]).astype(np.float32, copy=False) for h in self.heads}


class OnnxRuntime(Runtime):
    format = "onnx"
    name = FORMAT_SPECS[format].runtime
    GPU_PROVIDER = "CUDAExecutionProvider"

    def __init__(self, providers: list[str] | None = None) -> None:
        super().__init__()
        self.providers = providers  # None: CUDA when onnxruntime-gpu has it, else CPU

    @classmethod
    def unavailable_reason(cls, manifest: dict[str, Any]) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        return None

    @classmethod
    def device_kind(cls, manifest: dict[str, Any]) -> str:
        return "gpu" if cls.unavailable_reason(manifest) is None and cls.gpu_available() else "cpu"

    @staticmethod
    def gpu_available() -> bool:
        import onnxruntime as ort

        return OnnxRuntime.GPU_PROVIDER in ort.get_available_providers()

    def _load(self, path: Path, entry: dict[str, Any]) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = self.providers or [p for p in (self.GPU_PROVIDER, "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            # Several serving workers share the cores: each gets its share, and idle ORT threads sleep instead
            # of spinning, so the CPU time goes to decoding uploads in between model calls.
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        names = [i.name for i in self.session.get_inputs()]
        if names != [INPUT_NAME]:
            raise TransferkitError(f"{path}: inputs {names}, expected [{INPUT_NAME!r}]")

    @property
    def description(self) -> str:
        return f"onnxruntime ({self.session.get_providers()[0]})" if hasattr(self, "session") else self.name

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.heads, {INPUT_NAME: batch})
        return dict(zip(self.heads, outputs))


class TensorRTRuntime(Runtime):
    """TensorRT 10 execution: named I/O tensors, set_input_shape + set_tensor_address + execute_async_v3."""

    format = "tensorrt"
    name = FORMAT_SPECS[format].runtime

    @classmethod
    def unavailable_reason(cls, manifest: dict[str, Any]) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed; install the [gpu] extra on a CUDA machine"
        if importlib.util.find_spec("torch") is None:
            return "the tensorrt runtime uses torch for CUDA buffers; install torch"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device visible"
        built_for = (manifest["formats"].get(cls.format, {}).get("details") or {}).get("built_for_gpu", {})
        here = torch.cuda.get_device_name(torch.cuda.current_device())
        if built_for.get("name") and built_for["name"] != here:
            return f"the engine was built for {built_for['name']}, this GPU is {here}; re-export on this machine"
        return None

    def _load(self, path: Path, entry: dict[str, Any]) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TransferkitError(f"{path}: TensorRT could not deserialize the engine (version or GPU mismatch)")
        self.context = self.engine.create_execution_context()
        self.max_batch = int((entry.get("details") or {}).get("profile", {}).get("max_batch", MAX_BATCH))
        self.stream = torch.cuda.Stream()

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(batch).to("cuda", non_blocking=True)
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
            outputs = {}
            for head in self.heads:
                out = torch.empty(tuple(self.context.get_tensor_shape(head)), dtype=torch.float32, device="cuda")
                self.context.set_tensor_address(head, out.data_ptr())
                outputs[head] = out
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TransferkitError("TensorRT execution failed")
        self.stream.synchronize()
        return {h: t.cpu().numpy() for h, t in outputs.items()}


class TorchRuntime(Runtime):
    """Runs the AOTInductor package (model.pt2) with torch._inductor.aoti_load_package."""

    format = "aoti"
    name = FORMAT_SPECS[format].runtime

    @classmethod
    def unavailable_reason(cls, manifest: dict[str, Any]) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (the lean serving image leaves it out; use onnxruntime)"
        if cls.device_kind(manifest) == "gpu":
            import torch

            if not torch.cuda.is_available():
                return "the AOTInductor package was compiled for CUDA and no CUDA device is visible"
        return None

    @classmethod
    def device_kind(cls, manifest: dict[str, Any]) -> str:
        """The device the package was compiled for (a .pt2 runs only there)."""
        device = (manifest.get("formats", {}).get(cls.format, {}).get("details") or {}).get("device", "cpu")
        return "gpu" if device == "cuda" else "cpu"

    def _load(self, path: Path, entry: dict[str, Any]) -> None:
        import torch
        import torch._inductor

        self._torch = torch
        details = entry.get("details") or {}
        self.device = torch.device("cuda" if details.get("device") == "cuda" else "cpu")
        self.max_batch = int(details.get("batch_range", [MIN_BATCH, MAX_BATCH])[1])
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = torch._inductor.aoti_load_package(str(path))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            outputs = self.model(torch.from_numpy(batch).to(self.device))
        return {h: o.float().cpu().numpy() for h, o in zip(self.heads, outputs)}


_RUNNERS: dict[str, type[Runtime]] = {r.format: r for r in (TensorRTRuntime, OnnxRuntime, TorchRuntime)}
# --runtime name -> runner, in `auto` preference order; a row without a runner is a KeyError here, at import.
RUNTIMES: dict[str, type[Runtime]] = {name: _RUNNERS[spec_for_runtime(name).name] for name in RUNTIME_NAMES}
RUNTIME_CHOICES = ("auto", *RUNTIMES)


def runtime_problem(name: str, manifest: dict[str, Any], export_dir: str | Path | None = None) -> str | None:
    """Why runtime `name` cannot serve this export here (None when it can)."""
    cls = RUNTIMES[name]
    entry = manifest.get("formats", {}).get(cls.format)
    if entry is None or entry.get("status") is None:
        return f"the export has no {cls.format} artifact (transferkit export RUN --format {cls.format})"
    if not entry.get("servable"):
        return f"the {cls.format} artifact is not servable: {entry.get('status')} (see verify.json)"
    if export_dir is not None and not (Path(export_dir) / entry["file"]).is_file():
        return f"{Path(export_dir) / entry['file']} is missing"
    return cls.unavailable_reason(manifest)


def auto_order(manifest: dict[str, Any]) -> list[str]:
    """Fastest first: runtimes that would run this export on a GPU here, then CPU ones; within each, the table's
    auto_rank. Today: tensorrt > onnxruntime-gpu > torch on CUDA > onnxruntime on CPU > torch on CPU."""

    def key(name: str) -> tuple[bool, int]:
        cls = RUNTIMES[name]
        return cls.device_kind(manifest) != "gpu", FORMAT_SPECS[cls.format].auto_rank

    return sorted(RUNTIMES, key=key)


def select_runtime(name: str, manifest: dict[str, Any], export_dir: str | Path | None = None) -> Runtime:
    """`auto` or a runtime name -> an unloaded Runtime that can serve this export here, or a clear error."""
    if name not in RUNTIME_CHOICES:
        raise ConfigError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIME_CHOICES)}")
    if name != "auto":
        problem = runtime_problem(name, manifest, export_dir)
        if problem:
            raise TransferkitError(f"runtime {name} cannot serve this export: {problem}")
        return RUNTIMES[name]()
    reasons = {}
    for candidate in auto_order(manifest):
        problem = runtime_problem(candidate, manifest, export_dir)
        if problem is None:
            return RUNTIMES[candidate]()
        reasons[candidate] = problem
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise TransferkitError(f"no runtime can serve this export here ({detail})")


def load_runtime(name: str, export_dir: str | Path, manifest: dict[str, Any], threads: int | None = None,
                 verify: Callable[..., None] | None = None) -> Runtime:
    """Select and load a runtime. `verify(export_dir, manifest, names=[file])` checks the artifact first
    (serving passes the manifest's sha256 check, so a file changed after export is never loaded)."""
    runtime = select_runtime(name, manifest, export_dir)
    if verify is not None:
        verify(export_dir, manifest, names=[manifest["formats"][runtime.format]["file"]])
    runtime.threads = threads
    return runtime.load(export_dir, manifest)
