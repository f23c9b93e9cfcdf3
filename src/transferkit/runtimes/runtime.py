"""Runtimes: one interface over the engines that run an exported model.

    runtime = load_runtime("auto", export_dir, manifest)   # selection.py
    logits = runtime.run(batch)          # float32 (N,3,S,S), normalized -> {head: float32 (N, classes)}

    name         format    file          needs
    tensorrt     tensorrt  model.engine  tensorrt + CUDA (+ torch for device buffers); the GPU it was built for
    onnxruntime  onnx      model.onnx    onnxruntime (CPU) or onnxruntime-gpu (CUDA provider, used when present)
    torch        aoti      model.pt2     torch (a CUDA package also needs CUDA)
    openvino     openvino  model.xml     openvino (CPU plugin), with model.bin beside it

Each runner names the format it runs; its --runtime name, file and devices come from that format's row in
`transferkit.artifact.FORMAT_SPECS`, and a row without a runner fails here at import. An export may hold one
format at several precisions (`onnx`, `onnx-int8`, `onnx-fp16`: Manifest.artifacts keys, see
`transferkit.artifact.artifact_name`); a runner instance serves one of them (`Runtime.artifact`).

Which artifact `--runtime` picks is selection.py's. This module imports nothing heavy at import time: the lean
serving image has no torch, and only the runtime that is used imports its engine.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from transferkit.artifact import FORMAT_SPECS, INPUT_NAME, RUNTIME_NAMES, spec_for_runtime
from transferkit.errors import TransferkitError
from transferkit.manifest import ArtifactEntry, Manifest, RuntimeOptions

logger = logging.getLogger("transferkit.runtime")


class Runtime(ABC):
    format: ClassVar[str]  # the export format (a FORMAT_SPECS row) it loads
    name: ClassVar[str]  # what --runtime takes: the row's `runtime`

    def __init__(self, artifact: str | None = None) -> None:
        self.artifact = artifact or self.format  # the Manifest.artifacts key this instance loads
        self.heads: list[str] = []
        self.image_size = 0
        self.max_batch: int | None = None  # larger batches are split into chunks of this size
        self.threads: int | None = None  # intra-op threads (None: the engine's default, usually every core)
        self.options: RuntimeOptions | None = None  # None: the options export measured fastest (the entry's)
        self.selected_because = ""  # why select_runtime chose this artifact (the server logs it)

    @classmethod
    def option_candidates(cls) -> list[RuntimeOptions]:
        """The runtime options export measures (the first is what load uses when the entry names none)."""
        return [RuntimeOptions()]

    @classmethod
    def unavailable_reason(cls, entry: ArtifactEntry) -> str | None:
        """None if this runtime can run the artifact (its manifest entry) on this machine, else why not."""
        return None

    @classmethod
    def device_kind(cls, entry: ArtifactEntry) -> str:
        """Where this runtime would run the artifact here, "gpu" or "cpu": `auto` tries GPU ones first."""
        devices = FORMAT_SPECS[cls.format].devices
        return devices[0] if len(devices) == 1 else "cpu"

    def load(self, export_dir: str | Path, manifest: Manifest, verified: Mapping[str, bytes] | None = None) -> Runtime:
        """Load the artifact. `verified` (Manifest.read_verified): its files' bytes, already checked against
        their sha256; runtimes that can load from memory (ONNX Runtime, OpenVINO) load exactly those, so a file
        swapped after the check is never run; the others load from the path."""
        entry = manifest.artifacts[self.artifact]
        path = Path(export_dir) / entry.file
        if not path.is_file():
            raise TransferkitError(f"{path} not found; re-run `transferkit export RUN --format {self.format}`")
        self.heads = manifest.head_names
        self.image_size = manifest.image_size
        if self.options is None:
            self.options = entry.runtime_options
        self._load(path, entry, verified or {})
        return self

    @abstractmethod
    def _load(self, path: Path, entry: ArtifactEntry, verified: Mapping[str, bytes]) -> None:
        """Load the artifact at `path`; `verified`: the checked bytes of its files, where the runtime can use them."""

    @abstractmethod
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    @property
    def description(self) -> str:
        return self.name if self.artifact == self.format else f"{self.name} ({self.artifact})"

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N,3,S,S) normalized images -> {head: float32 logits (N, classes)}."""
        s = self.image_size
        if batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[1:] != (3, s, s) or len(batch) == 0:
            raise ValueError(f"expected a float32 batch (N,3,{s},{s}) with N >= 1, got {batch.dtype} {batch.shape}")
        batch = np.ascontiguousarray(batch)
        step = self.max_batch or len(batch)
        parts = [self._run(batch[i : i + step]) for i in range(0, len(batch), step)]
        return {h: np.concatenate([p[h] for p in parts]).astype(np.float32, copy=False) for h in self.heads}


_SHARED_ARENA: list[bool] = []  # [True] once this process's sessions share one CPU memory arena


def share_cpu_arena() -> None:
    """From now on, this process's ONNX Runtime sessions on the CPU take their memory from one arena (ONNX
    Runtime's environment allocator) instead of one arena each. For a server worker holding several models whose
    calls never overlap (batcher.py): a 224 px MobileNetV2 session's arena holds about 290 MB after a batch of
    32, so three sessions took 907 MB apart and 362 MB sharing one (measured here, onnxruntime 1.32)."""
    if _SHARED_ARENA or OnnxRuntime.missing():
        return
    import onnxruntime as ort

    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))  # ONNX Runtime's default arena
    _SHARED_ARENA.append(True)


def onnx_session(model: str | Path | bytes, providers: list[str] | None = None, threads: int | None = None):
    """An ONNX Runtime session as transferkit runs every ONNX model (serving, verify, the INT8 search): all graph
    optimisations (QDQ fusions included), the CPU provider unless `providers` says otherwise, and, with
    `threads`, that many intra-op threads that sleep instead of spinning when idle; in a process that called
    share_cpu_arena, CPU memory from the one shared arena."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if _SHARED_ARENA:
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        # Several serving workers share the cores: each gets its share, and idle ORT threads sleep instead
        # of spinning, so the CPU time goes to decoding uploads in between model calls.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])


class OnnxRuntime(Runtime):
    format = "onnx"
    name = FORMAT_SPECS[format].runtime
    GPU_PROVIDER = "CUDAExecutionProvider"

    def __init__(self, artifact: str | None = None, providers: list[str] | None = None) -> None:
        super().__init__(artifact)
        self.providers = providers  # None: CUDA when onnxruntime-gpu has it, else CPU

    @staticmethod
    def missing() -> str | None:
        """Why ONNX Runtime cannot run here (it is an install extra, see pyproject.toml), or None."""
        if importlib.util.find_spec("onnxruntime") is None:
            return "ONNX Runtime is not installed: pip install 'transferkit[cpu]' (or 'transferkit[gpu]' for CUDA)"
        return None

    @classmethod
    def unavailable_reason(cls, entry: ArtifactEntry) -> str | None:
        return cls.missing()

    @classmethod
    def device_kind(cls, entry: ArtifactEntry) -> str:
        return "gpu" if cls.unavailable_reason(entry) is None and cls.gpu_available() else "cpu"

    @staticmethod
    def gpu_available() -> bool:
        if OnnxRuntime.missing():
            return False
        import onnxruntime as ort

        return OnnxRuntime.GPU_PROVIDER in ort.get_available_providers()

    def _load(self, path: Path, entry: ArtifactEntry, verified: Mapping[str, bytes]) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = self.providers or [p for p in (self.GPU_PROVIDER, "CPUExecutionProvider") if p in available]
        # from the checked bytes when there are no external-data files beside the graph to resolve by path
        source = verified.get(entry.file) if len(entry.files) == 1 else None
        self.session = onnx_session(source or path, providers, self.threads)
        names = [i.name for i in self.session.get_inputs()]
        if names != [INPUT_NAME]:
            raise TransferkitError(f"{path}: inputs {names}, expected [{INPUT_NAME!r}]")

    @property
    def description(self) -> str:
        if not hasattr(self, "session"):
            return super().description
        provider = self.session.get_providers()[0]
        return (
            f"{self.name} ({provider})"
            if self.artifact == self.format
            else f"{self.name} ({self.artifact}, {provider})"
        )

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.heads, {INPUT_NAME: batch})
        return dict(zip(self.heads, outputs))


class TensorRTRuntime(Runtime):
    """TensorRT 10 execution: named I/O tensors, set_input_shape + set_tensor_address + execute_async_v3."""

    format = "tensorrt"
    name = FORMAT_SPECS[format].runtime

    @classmethod
    def unavailable_reason(cls, entry: ArtifactEntry) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed; install the [gpu] extra on a CUDA machine"
        if importlib.util.find_spec("torch") is None:
            return "the tensorrt runtime uses torch for CUDA buffers; install torch"
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device visible"
        here = torch.cuda.get_device_name(torch.cuda.current_device())
        if entry.built_for_gpu and entry.built_for_gpu != here:
            return f"the engine was built for {entry.built_for_gpu}, this GPU is {here}; re-export on this machine"
        return None

    def _load(self, path: Path, entry: ArtifactEntry, verified: Mapping[str, bytes]) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TransferkitError(f"{path}: TensorRT could not deserialize the engine (version or GPU mismatch)")
        self.context = self.engine.create_execution_context()
        self.max_batch = entry.max_batch
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
    def unavailable_reason(cls, entry: ArtifactEntry) -> str | None:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (the lean serving image leaves it out; use onnxruntime)"
        if cls.device_kind(entry) == "gpu":
            import torch

            if not torch.cuda.is_available():
                return "the AOTInductor package was compiled for CUDA and no CUDA device is visible"
        return None

    @classmethod
    def device_kind(cls, entry: ArtifactEntry) -> str:
        """The device the package was compiled for (a .pt2 runs only there)."""
        return "gpu" if entry.device == "cuda" else "cpu"

    def _load(self, path: Path, entry: ArtifactEntry, verified: Mapping[str, bytes]) -> None:
        import torch
        import torch._inductor

        self._torch = torch
        self.device = torch.device("cuda" if entry.device == "cuda" else "cpu")
        self.max_batch = entry.max_batch
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = torch._inductor.aoti_load_package(str(path))

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            outputs = self.model(torch.from_numpy(batch).to(self.device))
        return {h: o.float().cpu().numpy() for h, o in zip(self.heads, outputs)}


class OpenVinoRuntime(Runtime):
    """Runs the OpenVINO IR (model.xml + model.bin) on the CPU plugin, as OpenVINO's performance guide says.

    Two ways, and export measures both on its machine and records the faster in the entry's runtime options:
    LATENCY (one stream using every thread on the whole batch, one infer request) and THROUGHPUT (the plugin
    splits the threads into streams; one call's batch is split into as many parts as the compiled model's
    optimal number of infer requests, run at once through an AsyncInferQueue, and put back in order). With
    one synchronous request THROUGHPUT leaves streams idle, which is why it needs the parallel requests.
    Inference precision is pinned to the artifact's: f32, except for the bf16 artifact. On CPUs with AMX or
    AVX512-BF16 the plugin would otherwise run an fp32 IR in bf16 by default, which is not what verify measured.
    """

    format = "openvino"
    name = FORMAT_SPECS[format].runtime

    @classmethod
    def option_candidates(cls) -> list[RuntimeOptions]:
        return [RuntimeOptions("LATENCY", 1), RuntimeOptions("THROUGHPUT")]

    @classmethod
    def unavailable_reason(cls, entry: ArtifactEntry) -> str | None:
        try:
            import openvino  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - missing or broken, either way it cannot serve
            return f"openvino does not import ({type(exc).__name__}); pip install 'transferkit[openvino]'"
        if getattr(entry, "precision", None) == "bf16":
            return cls.bf16_unavailable_reason()
        return None

    @staticmethod
    def bf16_unavailable_reason() -> str | None:
        """None when OpenVINO's CPU plugin runs bf16 natively here (AVX512-BF16 or AMX): it lists BF16 among the
        CPU's optimization capabilities. Elsewhere a bf16 artifact would be emulated, slower than fp32."""
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" in capabilities:
            return None
        return (
            f"this CPU has no native bfloat16 (OpenVINO lists {', '.join(capabilities)}; bf16 needs AVX512-BF16 or "
            "AMX): use openvino or openvino-int8"
        )

    def _load(self, path: Path, entry: ArtifactEntry, verified: Mapping[str, bytes]) -> None:
        import threading

        import openvino as ov

        core = ov.Core()
        xml = verified.get(entry.files[0])
        weights = verified.get(entry.files[1]) if len(entry.files) > 1 else None
        if xml is not None and weights is not None:  # the checked bytes of the .xml and the .bin
            model = core.read_model(model=xml.decode(), weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
        else:
            model = core.read_model(str(path))  # reads the .bin of the same stem
        names = [i.get_any_name() for i in model.inputs]
        if names != [INPUT_NAME]:
            raise TransferkitError(f"{path}: inputs {names}, expected [{INPUT_NAME!r}]")
        if not model.inputs[0].get_partial_shape()[0].is_dynamic:  # serving sends any batch up to --max-batch
            model.reshape({INPUT_NAME: ov.PartialShape([-1, 3, self.image_size, self.image_size])})
        hint = (self.options.performance_hint if self.options else None) or "LATENCY"
        precision = "bf16" if entry.precision == "bf16" else "f32"  # what verify measured: never the plugin's pick
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)  # workers x threads stays within the cores
            # OpenVINO pins its threads to cores, counting from the first in every process: two one-thread
            # workers then share core 0 (measured at 224 px INT8: 120 + 120 img/s pinned, 247 + 253 not)
            if "ENABLE_CPU_PINNING" in core.get_property("CPU", "SUPPORTED_PROPERTIES"):
                config["ENABLE_CPU_PINNING"] = False
        self.compiled = core.compile_model(model, "CPU", config)
        # heads by output name (export names them); by position, in manifest order, when a name is missing
        outputs = self.compiled.outputs
        by_name = {n: o for o in outputs for n in o.get_names()}
        if len(outputs) != len(self.heads):
            raise TransferkitError(f"{path}: {len(outputs)} outputs, the manifest lists {len(self.heads)} heads")
        self.ports = [by_name.get(h, outputs[k]) for k, h in enumerate(self.heads)]
        optimal = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        wanted = self.options.infer_requests if self.options and self.options.infer_requests else optimal
        self.requests = max(1, min(wanted, optimal) if hint == "LATENCY" else wanted)
        self.request = self.compiled.create_infer_request()
        self.queue = ov.AsyncInferQueue(self.compiled, self.requests) if self.requests > 1 else None
        self._lock = threading.Lock()  # the requests serve one call at a time
        self.pairs_only = False
        self.pairs_only = self._batch_of_one_differs()

    # Some INT8 IRs (NNCF's, on OpenVINO 2026.4's CPU plugin) give one image alone other logits than the same
    # image in a batch: measured on the 32 px demo model, max |logit difference| 10.8, the answers near
    # uniform, while batches of 2 or more match ONNX Runtime. A server answers single requests at low load, so
    # each artifact is probed once at load; where one image alone differs, single images run as a pair.
    def _batch_of_one_differs(self) -> bool:
        probe = np.random.default_rng(0).standard_normal((2, 3, self.image_size, self.image_size)).astype(np.float32)
        pair = self._run(probe)
        alone = self._run(probe[:1])
        worst = max(float(np.abs(alone[h][0] - pair[h][0]).max()) for h in self.heads)
        scale = max(float(np.abs(pair[h]).max()) for h in self.heads)
        if worst <= 0.05 * (1.0 + scale):
            return False
        logger.warning(
            "%s: one image alone gives other logits than in a batch (max difference %.2f); single images run as a pair",
            self.artifact,
            worst,
        )
        return True

    @property
    def description(self) -> str:
        hint = (self.options.performance_hint if self.options else None) or "LATENCY"
        how = f"CPU, {hint.lower()}" + (f" x{self.requests}" if getattr(self, "requests", 1) > 1 else "")
        if hasattr(self, "compiled"):  # what the plugin runs in, as it reports it, when it is not float32
            precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            how += f", {precision}" if precision != "f32" else ""
        return f"{self.name} ({how})" if self.artifact == self.format else f"{self.name} ({self.artifact}, {how})"

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.pairs_only and len(batch) == 1:
            return {h: v[:1] for h, v in self._run(np.concatenate([batch, batch])).items()}
        with self._lock:
            if self.queue is None or len(batch) < 2:
                # share_outputs=False (the default) copies the results out of the request's reused buffers
                results = self.request.infer({INPUT_NAME: batch}, share_inputs=True)
                return {h: results[port] for h, port in zip(self.heads, self.ports)}
            # with pairs_only, no request gets a part of one image
            parts = np.array_split(batch, min(self.requests, len(batch) // 2 if self.pairs_only else len(batch)))
            out: list[Any] = [None] * len(parts)

            def done(request: Any, k: int) -> None:
                out[k] = [request.get_tensor(port).data.copy() for port in self.ports]

            self.queue.set_callback(done)
            for k, part in enumerate(parts):
                self.queue.start_async({INPUT_NAME: np.ascontiguousarray(part)}, userdata=k)
            self.queue.wait_all()
            return {h: np.concatenate([o[i] for o in out]) for i, h in enumerate(self.heads)}


_RUNNERS: dict[str, type[Runtime]] = {
    r.format: r for r in (TensorRTRuntime, OnnxRuntime, TorchRuntime, OpenVinoRuntime)
}
# --runtime name -> runner, in `auto` preference order; a row without a runner is a KeyError here, at import.
RUNTIMES: dict[str, type[Runtime]] = {name: _RUNNERS[spec_for_runtime(name).name] for name in RUNTIME_NAMES}
RUNNERS_BY_FORMAT: dict[str, type[Runtime]] = {f: _RUNNERS[f] for f in FORMAT_SPECS}
RUNTIME_CHOICES = ("auto", *RUNTIMES)  # plus the export's artifact names (onnx, onnx-int8, ...)


def runner_for(entry: ArtifactEntry) -> type[Runtime]:
    """The runner class of a manifest entry."""
    return RUNNERS_BY_FORMAT[entry.format]
