"""The BentoML service: one verified model from the BentoML model store, batched in-process, over HTTP.

    POST /predict   multipart `image` (one file) or repeated `images`, or JSON {"images": [base64, ...]};
                    optional top_k (1..100, default 5) -> top-k softmax labels per head   (see http_app.py)
    POST /v2/models/{name}/infer   the Open Inference Protocol (KServe v2, Triton's HTTP API), with its
                    metadata, health and config routes: the same batcher, limits and key   (see v2_routes.py)
    GET  /livez /readyz /metrics   BentoML's; /readyz answers 200 only after the warm-up inference
    GET  /docs.json                OpenAPI, with every status code each route can answer

Each BentoML worker process holds its own runtime (ONNX Runtime with `threads` intra-op threads, so that
workers x threads stays within the cores), a small decode thread pool and a MicroBatcher. Settings come from
the environment (settings.py): `transferkit serve` sets them, a container takes them with `docker run -e`.
The model tag is $TRANSFERKIT_MODEL or the Bento argument `model` that `transferkit build` records.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from PIL import Image

from transferkit.errors import ImageDecodeError
from transferkit.predictions import top_labels
from transferkit.runtimes.resolve import stored_model_path
from transferkit.runtimes.runtime import share_cpu_arena
from transferkit.serving.batcher import WorkerBudget
from transferkit.serving.capture import Capture
from transferkit.serving.control import RepositoryWatcher, SharedControl, default_state_dir
from transferkit.serving.drain import Drain
from transferkit.serving.drift_monitor import DriftMonitor
from transferkit.serving.http_app import InferenceFastPath, create_app
from transferkit.serving.inputs import ClientError
from transferkit.serving.keys import KeyRing
from transferkit.serving.protocol import install as install_coalescing_protocol
from transferkit.serving.repository import LOGITS, RANKED, ModelRepository, ServedVersion
from transferkit.serving.settings import MODEL_ENV, ServingSettings
from transferkit.serving.sources import parse_sources
from transferkit.serving.stack import http_stack
from transferkit.shift import HeadTest

logger = logging.getLogger("transferkit.serving")


def _log_like_bentoml() -> None:
    """A BentoML worker configures its own loggers only (before it imports this module): ours then go to the
    same output in the same format, so what the worker picked and its drain are in the server log."""
    ours, theirs = logging.getLogger("transferkit"), logging.getLogger("bentoml")
    if not ours.handlers and theirs.handlers:
        ours.handlers = list(theirs.handlers)
        ours.setLevel(logging.INFO)
        ours.propagate = False


_log_like_bentoml()
# A small image (a thumbnail, a digit) decodes in about 0.1 ms, less than handing it to a decode thread costs;
# larger ones go to the pool, so a multi-megapixel image never holds up the event loop. Decided by the pixels the
# header declares (after a JPEG's draft scaling), not by the upload's bytes: 2.5 KB of WebP can hold 64 MP.
INLINE_DECODE_PIXELS = 256 * 256
# Memory a decode holds per pixel, for the byte budget: the decoded image (up to 4 bands) and its RGB conversion
DECODE_BYTES_PER_PIXEL = 7
# Above this (as decoded: a camera JPEG drafts below it), an image is decoded at a lower CPU priority (_nicer)
BULK_DECODE_PIXELS = 1024 * 1024
BULK_NICENESS = 10


def _nicer() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads apart: nice is per thread there)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: the same priority as the other threads
        pass


SETTINGS = ServingSettings.from_env()
LISTED = parse_sources(SETTINGS.model or getattr(bentoml.use_arguments(), "model", None) or "")
if not LISTED and not SETTINGS.repository:
    raise RuntimeError(
        f"${MODEL_ENV} is not set: it names the BentoML models to serve. Use `transferkit serve RUN` "
        f"(or `transferkit build RUN`), or set {MODEL_ENV}=<tag from `transferkit export`>"
    )


# Before this worker's uvicorn loads its config: each answer leaves in one write, and POST /predict is answered
# in front of BentoML's middleware unless a setting needs that middleware to see it (protocol.py). Without
# httptools, /predict is answered from inside BentoML's middleware (add_asgi_middleware below).
PREDICT_IN_FRONT = not (SETTINGS.tracing or SETTINGS.access_log or SETTINGS.request_metrics)
install_coalescing_protocol(front=InferenceFastPath if PREDICT_IN_FRONT else None)

_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """Prometheus metrics, made on first use: BentoML sets the multiprocess directory in each worker after
    importing this module, and a metric created before that would never reach /metrics."""
    if not _METRICS:
        from prometheus_client import Counter, Gauge, Histogram

        _METRICS["batch"] = Histogram(
            "transferkit_batch_size", "images per runtime call", buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        _METRICS["refused"] = Counter("transferkit_refused_requests", "requests refused by the server", ["reason"])
        # one cheap counter in place of BentoML's per-request metrics (off by default, settings.py): the request
        # and error rates stay on /metrics
        _METRICS["answers"] = Counter(
            "transferkit_requests", "answered inference requests (/predict and v2 infer)", ["status"]
        )
        labels = ["model", "version"]
        _METRICS["model_answers"] = Counter(
            "transferkit_model_requests", "inference requests answered, per model and version", labels
        )
        _METRICS["model_memory"] = Gauge(
            "transferkit_model_memory_bytes",
            "memory a loaded version took (all workers)",
            labels,
            multiprocess_mode="livesum",
        )
        _METRICS["model_loaded"] = Gauge(
            "transferkit_model_loaded", "workers holding the version", labels, multiprocess_mode="livesum"
        )
        _METRICS["model_default"] = Gauge(
            "transferkit_model_default", "1 where the version serves by default", labels, multiprocess_mode="max"
        )
        _METRICS["capture_rows"] = Counter("transferkit_capture_rows", "captured rows committed to parts")
        _METRICS["capture_dropped"] = Counter(
            "transferkit_capture_dropped_rows", "captured rows dropped instead of holding a request", ["reason"]
        )
        # live signals on the capture sample (capture.py): top-1 confidence and predicted classes per head
        _METRICS["confidence"] = Histogram(
            "transferkit_capture_top1_confidence",
            "top-1 softmax score of captured images, per model, version and head",
            ["model", "version", "head"],
            buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
        )
        _METRICS["predicted"] = Counter(
            "transferkit_capture_predictions",
            "top-1 class of captured images, per model, version and head (heads of at most 100 classes)",
            ["model", "version", "head", "label"],
        )
        # the live drift score (drift_monitor.py): the capture sample against the artifact's stored reference
        _METRICS["drift_p"] = Gauge(
            "transferkit_drift_p",
            "smallest corrected p-value of the shift tests on the newest captured outputs (low: drift)",
            ["model", "version", "head"],
            multiprocess_mode="livemin",
        )
        _METRICS["drift"] = Gauge(
            "transferkit_drift",
            "1 when the newest captured outputs drifted from the reference (p below alpha), else 0",
            ["model", "version", "head"],
            multiprocess_mode="livemax",
        )
        _METRICS["stack"] = Gauge(
            "transferkit_http_stack",
            "the event loop and HTTP parser this worker runs",
            ["loop", "parser"],
            multiprocess_mode="max",
        )
    return _METRICS


MAX_CLASSES_COUNTED = 100  # a head with more classes has no per-class series (Prometheus cardinality)


def _observe_sample(model: str, version: str, top1: dict[str, tuple[list[str], np.ndarray, int]]) -> None:
    """The capture sample's live signals (called by the capture's writer thread, off the request path)."""
    from collections import Counter

    metrics = _metrics()
    for head, (labels, scores, classes) in top1.items():
        confidence = metrics["confidence"].labels(model, version, head)
        for score in scores.tolist():
            confidence.observe(score)
        if classes <= MAX_CLASSES_COUNTED:
            for label, n in Counter(labels).items():
                metrics["predicted"].labels(model, version, head, label).inc(n)


def _report_drift(model: str, version: str, head: str, result: HeadTest) -> None:
    metrics = _metrics()
    metrics["drift_p"].labels(model, version, head).set(result.p)
    metrics["drift"].labels(model, version, head).set(int(result.drift))


def bentoml_config(settings: ServingSettings) -> dict[str, Any]:
    """BentoML's own configuration keys for the middleware around every request (settings.py says why they are
    off by default). Service-level values are BentoML's defaults: BENTOML_CONFIG(_OPTIONS) still override them."""
    return {
        "workers": settings.resolved_workers,
        "traffic": {"timeout": settings.timeout_s + 5},
        "logging": {"access": {"enabled": settings.access_log}},
        "metrics": {"enabled": settings.request_metrics},
        # OpenTelemetry's ASGI middleware is always installed; an excluded URL passes through it untouched
        "tracing": {"excluded_urls": [] if settings.tracing else ["predict"]},
    }


class _Service:
    def __init__(self) -> None:
        self.settings = SETTINGS
        self.capture: Capture | None = None  # made last, once the models serve (--capture)
        self.keys = KeyRing.for_worker(SETTINGS)  # the API keys, re-read when their file changes (keys.py)
        self.ready = False
        self.stack = http_stack()  # before the drain wraps uvicorn's SIGTERM handler, through which it is found
        self.drain = Drain(SETTINGS.drain_s)
        self.drain.install()  # uvicorn's SIGTERM handler is in place by now: the drain runs before it
        self.budget = WorkerBudget(SETTINGS.max_queue, SETTINGS.max_inflight_mb << 20)
        share_cpu_arena()  # the worker's ONNX Runtime models take turns (one runtime thread): one arena for all
        self.repository = ModelRepository(SETTINGS, self.budget, on_batch=lambda n: _metrics()["batch"].observe(n))
        self.repository.locate = self._locate
        self.repository.on_change = _report_models
        folder = Path(SETTINGS.repository) if SETTINGS.repository else None
        self.watcher = RepositoryWatcher(
            self.repository,
            SharedControl(Path(SETTINGS.state_dir) if SETTINGS.state_dir else default_state_dir()),
            LISTED,
            folder,
            SETTINGS.poll_s,
        )
        self.watcher.sync()  # every listed version loaded, verified and warmed (or refused) before ready
        if not self.repository.models:
            reasons = "; ".join(f"{r['name']}:{r['version']}: {r.get('reason')}" for r in self.index())
            raise RuntimeError(f"no model version could be served: {reasons or 'the repository is empty'}")
        self.watcher.start()
        # Decoding is Python + Pillow work per image; a few threads overlap it with socket I/O and the model call
        # without oversubscribing the cores the other workers use.
        self.decode_pool = ThreadPoolExecutor(
            max(2, SETTINGS.resolved_threads), thread_name_prefix="transferkit-decode"
        )
        # Images of more than BULK_DECODE_PIXELS decode one at a time in a thread of lower CPU priority: a client
        # sending large (valid) images gets the CPU the others leave, instead of taking it from them
        self.bulk_pool = ThreadPoolExecutor(1, thread_name_prefix="transferkit-decode-bulk", initializer=_nicer)
        _metrics()["stack"].labels(**self.stack).set(1)
        self.capture = (
            Capture(
                SETTINGS.capture_dir,
                SETTINGS.capture_rate,
                SETTINGS.capture_max_mb << 20,
                on_drop=lambda reason, n: _metrics()["capture_dropped"].labels(reason=reason).inc(n),
                on_write=lambda n: _metrics()["capture_rows"].inc(n),
                on_rows=_observe_sample,
                on_outputs=DriftMonitor(_report_drift).observe,
            )
            if SETTINGS.capture_dir
            else None
        )
        self.ready = True
        for entry in self.repository.models.values():
            default = entry.versions[entry.default]
            logger.info(
                "model %s: version %s with %s (%s)",
                default.name,
                default.version,
                default.runtime_name,
                default.runtime.selected_because,
            )
        logger.info(
            "serving %d models; HTTP: %s loop, %s parser; settings %s",
            len(self.repository.models),
            self.stack["loop"],
            self.stack["parser"],
            SETTINGS.describe(),
        )

    def __is_ready__(self) -> bool:
        return self.ready and not self.drain.draining

    @property
    def _only(self) -> ServedVersion:
        """What answers a call that names no model (classify without `model`): the first model's default."""
        found = self.repository.any_version()
        if found is None:
            raise ClientError(503, "no model is loaded")
        return found

    def _locate(self, tag: str) -> Path | None:
        """A stored model's folder: a Bento's own models (class attributes), else the model store."""
        attribute = MODEL_ATTRIBUTES.get(tag)
        return Path(getattr(self, attribute).path) if attribute else stored_model_path(tag)

    def index(self) -> list[dict[str, Any]]:
        return self.repository.index(self.watcher.sources)

    @bentoml.on_shutdown
    def _release(self) -> None:
        self.watcher.stop()
        for entry in self.repository.models.values():
            for version in entry.versions.values():
                version.batcher.close()
        self.repository.executor.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.bulk_pool.shutdown(wait=False, cancel_futures=True)
        if self.capture is not None:
            self.capture.close()  # what was sampled before the shutdown is written

    def _open(self, data: bytes, name: str, model: ServedVersion) -> Image.Image:
        """Encoded bytes -> an opened image within the model's pixel limit (header only); only JPEG, PNG and WebP
        are parsed at all."""
        try:
            return model.pre.open_served(data, name, model.max_pixels)
        except ImageDecodeError as exc:
            raise ClientError(exc.http_status, str(exc)) from None

    def _pixels(self, image: Image.Image, name: str, model: ServedVersion | None = None) -> np.ndarray:
        """An opened image -> uint8 (S,S,3) at the model's size."""
        try:
            return (model or self._only).pre.finish_served(image, name)
        except ImageDecodeError as exc:
            raise ClientError(exc.http_status, str(exc)) from None

    async def decode(
        self, images: list[bytes], names: list[str], admission: Any = None, model: ServedVersion | None = None
    ) -> np.ndarray:
        """Encoded images -> uint8 (N,S,S,3) for `model` (default: the only one); a ClientError names the first that does not decode. Every header
        is read and checked first, so an image over the limit is refused before any other is decoded; then the
        memory their decode takes is reserved in the worker's byte budget (`admission`, batcher.py): 503 when
        other requests hold it, 413 when this request alone needs more than the whole budget."""
        model = model or self._only
        opened, cost = [], 0
        for data, name in zip(images, names):  # stops at the first header that puts the request past the budget
            opened.append(self._open(data, name, model))
            cost += DECODE_BYTES_PER_PIXEL * opened[-1].width * opened[-1].height
            if admission is not None and cost > self.budget.max_bytes:
                raise ClientError(
                    413,
                    f"decoding these {len(images)} images takes more than a worker holds for all requests "
                    f"({self.budget.max_bytes >> 20} MB, passed at {name}); send fewer or smaller images",
                )
        if admission is not None:
            admission.add_bytes(cost)
        if len(opened) == 1 and opened[0].width * opened[0].height <= INLINE_DECODE_PIXELS:
            return self._pixels(opened[0], names[0], model)[None]  # cheaper than the hop to a decode thread and back
        loop = asyncio.get_running_loop()
        pools = [self.bulk_pool if i.width * i.height > BULK_DECODE_PIXELS else self.decode_pool for i in opened]
        pixels = await asyncio.gather(
            *(loop.run_in_executor(pool, self._pixels, i, name, model) for pool, i, name in zip(pools, opened, names))
        )
        return np.stack(pixels)

    async def infer(
        self, batch: np.ndarray, model: ServedVersion | None = None, request_id: str = ""
    ) -> dict[tuple[str, str], np.ndarray]:
        """uint8 pixels or float32 model input, through the model's batcher -> this request's rows of
        `ServedVersion.run_batch`'s answer (sampled into the capture, when there is one)."""
        model = model or self._only
        answer = await model.batcher.submit(batch)
        if self.capture is not None:
            self.capture.offer(model, batch, answer, request_id, RANKED, LOGITS)
        return answer

    async def classify(
        self,
        images: list[bytes],
        names: list[str] | None = None,
        top_k: int = 5,
        admission: Any = None,
        model: ServedVersion | None = None,
        request_id: str = "",
    ) -> list[dict]:
        """Encoded images -> [{"heads": {head: top-k labels}}], in order, through the worker's batcher;
        `admission`: the request's (guard.py), which the decode's memory is reserved in."""
        model = model or self._only
        names = names or [f"images[{i}]" for i in range(len(images))]
        answer = await self.infer(await self.decode(images, names, admission, model), model, request_id)
        labels = model.labels
        return [
            {"heads": {h: top_labels(answer[h, RANKED][i], labels[h], top_k) for h in labels}}
            for i in range(len(images))
        ]

    def metrics_text(self) -> tuple[bytes, str]:
        """What BentoML's /metrics answers: its metrics client reads the multiprocess directory it set up."""
        from bentoml._internal.configuration.containers import BentoMLContainer

        client = BentoMLContainer.metrics_client.get()
        return client.generate_latest(), client.CONTENT_TYPE_LATEST

    def count_answer(self, status: int) -> None:
        _metrics()["answers"].labels(status=str(status)).inc()

    def count_refusal(self, reason: str) -> None:
        _metrics()["refused"].labels(reason=reason).inc()

    def count_model_answer(self, model: ServedVersion) -> None:
        counter = model.answers_counter  # looked up once per version: labels() costs more than inc()
        if counter is None:
            counter = model.answers_counter = _metrics()["model_answers"].labels(
                model=model.name, version=model.version
            )
        counter.inc()


def _report_models(repository: ModelRepository) -> None:
    """/metrics after each repository change: per model and version, whether it is loaded, whether it is the
    default, and the memory its load took in this worker (summed over the live workers)."""
    m = _metrics()
    shown = m.setdefault("shown_versions", set())
    now = set()
    for name, entry in repository.models.items():
        for version, served in entry.versions.items():
            now.add((name, version))
            m["model_memory"].labels(model=name, version=version).set(served.memory_bytes)
            m["model_default"].labels(model=name, version=version).set(int(entry.default == version))
            m["model_loaded"].labels(model=name, version=version).set(1)
    for name, version in shown - now:  # unloaded: a gauge of a multiprocess registry cannot be removed
        m["model_memory"].labels(model=name, version=version).set(0)
        m["model_default"].labels(model=name, version=version).set(0)
        m["model_loaded"].labels(model=name, version=version).set(0)
    m["shown_versions"] = now | shown


# One class attribute per listed model, so `bentoml build` bundles every one into the Bento.
# Read through the instance, such an attribute resolves to the stored model (the Bento's own in a container).
MODEL_ATTRIBUTES = {source.tag: f"model_ref_{i}" for i, source in enumerate(LISTED)}
for _tag, _attribute in MODEL_ATTRIBUTES.items():
    setattr(_Service, _attribute, bentoml.models.BentoModel(_tag))
TransferkitService = bentoml.service(name="transferkit", **bentoml_config(SETTINGS))(
    bentoml.asgi_app(create_app(), path="/")(_Service)
)
TransferkitService.add_asgi_middleware(InferenceFastPath)
