"""The BentoML service: one verified model from the BentoML model store, batched in-process, over HTTP.

    POST /predict   multipart `image` (one file) or repeated `images`, or JSON {"images": [base64, ...]};
                    optional top_k (1..100, default 5) -> top-k softmax labels per head   (see http_app.py)
    GET  /livez /readyz /metrics   BentoML's; /readyz answers 200 only after the warm-up inference
    GET  /docs.json                OpenAPI, with every status code /predict can answer

Each BentoML worker process holds its own runtime (ONNX Runtime with `threads` intra-op threads, so that
workers x threads stays within the cores), a small decode thread pool and a MicroBatcher. Settings come from
the environment (settings.py): `transferkit serve` sets them, a container takes them with `docker run -e`.
The model tag is $TRANSFERKIT_MODEL or the Bento argument `model` that `transferkit build` records.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from transferkit.errors import ImageDecodeError
from transferkit.preprocess import SERVED_FORMATS, Preprocessing, decode_image
from transferkit.serving.batcher import MicroBatcher
from transferkit.serving.http_app import create_app
from transferkit.serving.inputs import ClientError
from transferkit.manifest import read_manifest
from transferkit.serving.runtime import load_runtime
from transferkit.serving.settings import MODEL_ENV, ServingSettings

logger = logging.getLogger("transferkit.serving")

SETTINGS = ServingSettings.from_env()
MODEL_TAG = SETTINGS.model or getattr(bentoml.use_arguments(), "model", None) or ""
if not MODEL_TAG:
    raise RuntimeError(
        f"${MODEL_ENV} is not set: it names the BentoML model to serve. Use `transferkit serve RUN` "
        f"(or `transferkit build RUN`), or set {MODEL_ENV}=<tag from `transferkit export`>"
    )


def softmax_top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-p, kind="stable")[: min(k, len(labels))]
    return [{"label": labels[i], "score": round(float(p[i]), 6)} for i in order]


_METRICS: dict[str, Any] = {}


def _metrics() -> dict[str, Any]:
    """Prometheus metrics, made on first use: BentoML sets the multiprocess directory in each worker after
    importing this module, and a metric created before that would never reach /metrics."""
    if not _METRICS:
        from prometheus_client import Counter, Histogram

        _METRICS["batch"] = Histogram("transferkit_batch_size", "images per runtime call",
                                      buckets=(1, 2, 4, 8, 16, 32, 64))  # fmt: skip
        _METRICS["refused"] = Counter("transferkit_refused_requests", "requests refused by the server", ["reason"])
    return _METRICS


@bentoml.service(name="transferkit", workers=SETTINGS.resolved_workers, traffic={"timeout": SETTINGS.timeout_s + 5})
@bentoml.asgi_app(create_app(), path="/")
class TransferkitService:
    # A class attribute, so `bentoml build` bundles this model into the Bento.
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.ready = False
        stored = self.model_ref  # resolved from the model store ($BENTOML_HOME, or the Bento's own models)
        self.export_dir = Path(stored.path)
        self.manifest = read_manifest(self.export_dir)
        self.tag = str(stored.tag)
        self.pre = Preprocessing.from_dict(self.manifest.preprocessing)  # never re-derived here
        self.labels: dict[str, list[str]] = {h: list(c) for h, c in self.manifest.heads.items()}
        self.runtime = load_runtime(SETTINGS.runtime, self.export_dir, self.manifest, threads=SETTINGS.resolved_threads,
                                    check_files=True)  # fmt: skip
        self.runtime_name = self.runtime.description
        self.batcher = MicroBatcher(self._run_batch, SETTINGS.max_batch, SETTINGS.max_wait_ms, SETTINGS.max_queue,
                                    on_batch=lambda n: _metrics()["batch"].observe(n))  # fmt: skip
        # Decoding is Python + Pillow work per image; a few threads overlap it with socket I/O and the model call
        # without oversubscribing the cores the other workers use.
        self.decode_pool = ThreadPoolExecutor(max(2, SETTINGS.resolved_threads), thread_name_prefix="transferkit-decode")
        s = self.pre.image_size
        for n in sorted({1, SETTINGS.max_batch}):  # first calls at a new batch size allocate: do them now
            self._run_batch(np.zeros((n, s, s, 3), np.uint8))
        self.ready = True
        logger.info("serving %s with %s (%s); settings %s", self.tag, self.runtime_name, self.runtime.selected_because,
                    SETTINGS.describe())  # fmt: skip

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.on_shutdown
    def _release(self) -> None:
        self.batcher.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def _run_batch(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self.runtime.run(self.pre.normalize_numpy(pixels))

    def _pixels(self, data: bytes, name: str) -> np.ndarray:
        """Encoded bytes -> uint8 (S,S,3); only JPEG, PNG and WebP are parsed at all."""
        try:
            image = decode_image(data, name=name, formats=SERVED_FORMATS)
        except ImageDecodeError as exc:
            raise ClientError(exc.http_status, str(exc)) from None
        return self.pre.pil_to_uint8(image)

    async def classify(self, images: list[bytes], names: list[str] | None = None, top_k: int = 5) -> list[dict]:
        """Encoded images -> [{"heads": {head: top-k labels}}], in order, through the worker's batcher."""
        loop = asyncio.get_running_loop()
        names = names or [f"images[{i}]" for i in range(len(images))]
        pixels = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self._pixels, data, name)
                                        for data, name in zip(images, names)))  # fmt: skip
        logits = await self.batcher.submit(np.stack(pixels))
        return [{"heads": {h: softmax_top_k(logits[h][i], self.labels[h], top_k) for h in self.labels}}
                for i in range(len(images))]  # fmt: skip

    def count_refusal(self, reason: str) -> None:
        _metrics()["refused"].labels(reason=reason).inc()
