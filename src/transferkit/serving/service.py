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
from transferkit.manifest import read_manifest
from transferkit.predictions import rank, top_labels
from transferkit.preprocess import Preprocessing, served_pixel_limit
from transferkit.serving.batcher import MicroBatcher
from transferkit.serving.drain import Drain
from transferkit.serving.http_app import InferenceFastPath, create_app
from transferkit.serving.inputs import ClientError
from transferkit.serving.keys import KeyRing
from transferkit.serving.protocol import install as install_coalescing_protocol
from transferkit.serving.selection import load_runtime
from transferkit.serving.settings import MODEL_ENV, ServingSettings
from transferkit.serving.stack import http_stack

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
MODEL_TAG = SETTINGS.model or getattr(bentoml.use_arguments(), "model", None) or ""
if not MODEL_TAG:
    raise RuntimeError(
        f"${MODEL_ENV} is not set: it names the BentoML model to serve. Use `transferkit serve RUN` "
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
        _METRICS["stack"] = Gauge(
            "transferkit_http_stack",
            "the event loop and HTTP parser this worker runs",
            ["loop", "parser"],
            multiprocess_mode="max",
        )
    return _METRICS


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


@bentoml.service(name="transferkit", **bentoml_config(SETTINGS))
@bentoml.asgi_app(create_app(), path="/")
class TransferkitService:
    # A class attribute, so `bentoml build` bundles this model into the Bento.
    model_ref = bentoml.models.BentoModel(MODEL_TAG)
    RANKED, LOGITS = "ranked", "logits"  # what a batch answers per head (_run_batch)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.keys = KeyRing.for_worker(SETTINGS)  # the API keys, re-read when their file changes (keys.py)
        self.ready = False
        self.stack = http_stack()  # before the drain wraps uvicorn's SIGTERM handler, through which it is found
        self.drain = Drain(SETTINGS.drain_s)
        self.drain.install()  # uvicorn's SIGTERM handler is in place by now: the drain runs before it
        stored = self.model_ref  # resolved from the model store ($BENTOML_HOME, or the Bento's own models)
        self.export_dir = Path(stored.path)
        self.manifest = read_manifest(self.export_dir)
        self.tag = str(stored.tag)
        self.pre = Preprocessing.from_dict(self.manifest.preprocessing)  # never re-derived here
        self.max_pixels = SETTINGS.max_pixels or served_pixel_limit(self.pre.image_size)
        self.labels: dict[str, list[str]] = {h: list(c) for h, c in self.manifest.heads.items()}
        self.runtime = load_runtime(
            SETTINGS.runtime, self.export_dir, self.manifest, threads=SETTINGS.resolved_threads, check_files=True
        )
        self.runtime_name = self.runtime.description
        self.batcher = MicroBatcher(
            self._run_batch,
            SETTINGS.max_batch,
            SETTINGS.max_wait_ms,
            SETTINGS.max_queue,
            on_batch=lambda n: _metrics()["batch"].observe(n),
            combine=self._combine,
            max_bytes=SETTINGS.max_inflight_mb << 20,
        )
        # Decoding is Python + Pillow work per image; a few threads overlap it with socket I/O and the model call
        # without oversubscribing the cores the other workers use.
        self.decode_pool = ThreadPoolExecutor(
            max(2, SETTINGS.resolved_threads), thread_name_prefix="transferkit-decode"
        )
        # Images of more than BULK_DECODE_PIXELS decode one at a time in a thread of lower CPU priority: a client
        # sending large (valid) images gets the CPU the others leave, instead of taking it from them
        self.bulk_pool = ThreadPoolExecutor(1, thread_name_prefix="transferkit-decode-bulk", initializer=_nicer)
        s = self.pre.image_size
        for n in sorted({1, SETTINGS.max_batch}):  # first calls at a new batch size allocate: do them now
            self._run_batch(np.zeros((n, s, s, 3), np.uint8))
        _metrics()["stack"].labels(**self.stack).set(1)
        self.ready = True
        logger.info(
            "serving %s with %s (%s); HTTP: %s loop, %s parser; settings %s",
            self.tag,
            self.runtime_name,
            self.runtime.selected_because,
            self.stack["loop"],
            self.stack["parser"],
            SETTINGS.describe(),
        )

    def __is_ready__(self) -> bool:
        return self.ready and not self.drain.draining

    @bentoml.on_shutdown
    def _release(self) -> None:
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.bulk_pool.shutdown(wait=False, cancel_futures=True)

    def _run_batch(self, batch: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """uint8 (B,S,S,3) pixels or float32 (B,3,S,S) model input -> per head, (head, RANKED): the (B, C)
        ranked answers, and (head, LOGITS): the logits (copied: a runtime may reuse its output buffers)."""
        x = self.pre.normalize_numpy(batch) if batch.dtype == np.uint8 else batch
        out: dict[tuple[str, str], np.ndarray] = {}
        for head, logits in self.runtime.run(x).items():
            out[head, self.RANKED] = rank(logits)
            out[head, self.LOGITS] = np.array(logits, np.float32)
        return out

    def _combine(self, parts: list[np.ndarray]) -> np.ndarray:
        """One batch from requests' pixels and preprocessed tensors (v2's FP32 input): normalised together when
        both kinds meet in one batch."""
        if all(p.dtype == parts[0].dtype for p in parts):
            return np.concatenate(parts)
        return np.concatenate([self.pre.normalize_numpy(p) if p.dtype == np.uint8 else p for p in parts])

    def _open(self, data: bytes, name: str) -> Image.Image:
        """Encoded bytes -> an opened image within the pixel limit (header only); only JPEG, PNG and WebP are
        parsed at all."""
        try:
            return self.pre.open_served(data, name, self.max_pixels)
        except ImageDecodeError as exc:
            raise ClientError(exc.http_status, str(exc)) from None

    def _pixels(self, image: Image.Image, name: str) -> np.ndarray:
        """An opened image -> uint8 (S,S,3)."""
        try:
            return self.pre.finish_served(image, name)
        except ImageDecodeError as exc:
            raise ClientError(exc.http_status, str(exc)) from None

    async def decode(self, images: list[bytes], names: list[str], admission: Any = None) -> np.ndarray:
        """Encoded images -> uint8 (N,S,S,3); a ClientError names the first that does not decode. Every header
        is read and checked first, so an image over the limit is refused before any other is decoded; then the
        memory their decode takes is reserved in the worker's byte budget (`admission`, batcher.py): 503 when
        other requests hold it, 413 when this request alone needs more than the whole budget."""
        opened, cost = [], 0
        for data, name in zip(images, names):  # stops at the first header that puts the request past the budget
            opened.append(self._open(data, name))
            cost += DECODE_BYTES_PER_PIXEL * opened[-1].width * opened[-1].height
            if admission is not None and cost > self.batcher.max_bytes:
                raise ClientError(
                    413,
                    f"decoding these {len(images)} images takes more than a worker holds for all requests "
                    f"({self.batcher.max_bytes >> 20} MB, passed at {name}); send fewer or smaller images",
                )
        if admission is not None:
            admission.add_bytes(cost)
        if len(opened) == 1 and opened[0].width * opened[0].height <= INLINE_DECODE_PIXELS:
            return self._pixels(opened[0], names[0])[None]  # cheaper than the hop to a decode thread and back
        loop = asyncio.get_running_loop()
        pools = [self.bulk_pool if i.width * i.height > BULK_DECODE_PIXELS else self.decode_pool for i in opened]
        pixels = await asyncio.gather(
            *(loop.run_in_executor(pool, self._pixels, i, name) for pool, i, name in zip(pools, opened, names))
        )
        return np.stack(pixels)

    async def infer(self, batch: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """uint8 pixels or float32 model input, through the worker's batcher -> this request's rows of
        `_run_batch`'s answer."""
        return await self.batcher.submit(batch)

    async def classify(
        self, images: list[bytes], names: list[str] | None = None, top_k: int = 5, admission: Any = None
    ) -> list[dict]:
        """Encoded images -> [{"heads": {head: top-k labels}}], in order, through the worker's batcher;
        `admission`: the request's (guard.py), which the decode's memory is reserved in."""
        names = names or [f"images[{i}]" for i in range(len(images))]
        answer = await self.infer(await self.decode(images, names, admission))
        return [
            {"heads": {h: top_labels(answer[h, self.RANKED][i], self.labels[h], top_k) for h in self.labels}}
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


TransferkitService.add_asgi_middleware(InferenceFastPath)
