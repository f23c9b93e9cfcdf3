"""The HTTP service: BentoML 1.4, one model from the BentoML model store, adaptive batching.

    POST /predict   multipart/form-data: image=@photo.jpg (JPEG, PNG or WebP), top_k=5 (optional, 1..100)
                    -> {"heads": {head: [{"label": str, "score": float}, ...]}, "model": tag, "runtime": name}
    POST /infer     the batched model step /predict calls internally (base64 uint8 pixels in, logits out)
    GET  /livez /readyz /metrics /docs.json   from BentoML

Request path: the upload is decoded and resized per request (in a thread, so the event loop stays free),
then /predict calls the batchable `infer` through BentoML's own proxy (`self.to_async.infer`), so concurrent
requests are merged into one runtime call (see /metrics: bentoml_service_adaptive_batch_size).

Bad input gets a 4xx JSON body {"error": "..."} naming the problem: 400 for a missing field, an unreadable or
corrupt image or a bad top_k (BentoML's validation answer, which adds "detail"), 413 for a body over
MAX_UPLOAD_BYTES or an image over the pixel limit, 415 for a body that is not multipart/form-data or an image
format other than JPEG/PNG/WebP. The model is chosen by $TRANSFERKIT_MODEL (a BentoML model tag; `transferkit serve`
sets it) or the Bento argument `model` (`transferkit build` sets it), the runtime by $TRANSFERKIT_RUNTIME (auto).
"""
import asyncio
import base64
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import Field
from starlette.responses import JSONResponse

from transferkit.errors import ImageDecodeError
from transferkit.preprocess import Preprocessing, decode_image
from transferkit.serving.manifest import read_manifest
from transferkit.serving.runtime import load_runtime
from transferkit.serving.upload import UploadCheck

MODEL_ENV = "TRANSFERKIT_MODEL"
RUNTIME_ENV = "TRANSFERKIT_RUNTIME"
MAX_BATCH_SIZE = 32  # images per runtime call; below the dynamic-batch ceiling compiled into engines (64)
# Requests wait at most this long in the batching queue before BentoML answers 503. Generous on purpose: on a
# 2-core CPU a burst of 100 requests takes seconds to drain, and a tight bound rejects most of it.
MAX_LATENCY_MS = 20_000
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_TOP_K = 100
ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}  # PIL format names (MPO: the multi-picture JPEG of cameras)

# The model tag: $TRANSFERKIT_MODEL (set by `transferkit serve`), else the Bento argument `model` that
# `transferkit build` records (`bentoml build --arg model=TAG`; BentoML restores it wherever the Bento is served).
MODEL_TAG = os.environ.get(MODEL_ENV) or getattr(bentoml.use_arguments(), "model", None) or ""
if not MODEL_TAG:
    raise RuntimeError(
        f"${MODEL_ENV} is not set: it names the BentoML model to serve. Use `transferkit serve RUN` "
        f"(or `transferkit build RUN`), or set {MODEL_ENV}=<tag from `transferkit export`>"
    )


class BadInput(Exception):
    """A client error: answered with its status code and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def softmax_top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-p, kind="stable")[: min(k, len(labels))]
    return [{"label": labels[i], "score": round(float(p[i]), 6)} for i in order]


@bentoml.service(name="transferkit", workers=1, traffic={"timeout": 120})
class TransferkitService:
    # A class attribute, so `bentoml build` bundles this model into the Bento.
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        stored = self.model_ref  # resolved from the model store ($BENTOML_HOME, or the Bento's own models)
        self.export_dir = Path(stored.path)
        self.manifest = read_manifest(self.export_dir)
        self.tag = str(stored.tag)
        self.pre = Preprocessing.from_dict(self.manifest["preprocessing"])  # never re-derived here
        self.labels: dict[str, list[str]] = self.manifest["heads"]
        self.runtime = load_runtime(os.environ.get(RUNTIME_ENV, "auto"), self.export_dir, self.manifest)
        self.runtime_name = self.runtime.description
        self.runtime.run(np.zeros((1, 3, self.pre.image_size, self.pre.image_size), np.float32))  # warm-up

    # ---- per request: bytes -> uint8 pixels (decode, check, resize) --------------------------------------
    def _pixels(self, path: Path) -> bytes:
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise BadInput(413, f"image file is {size / 1e6:.1f} MB, over the {MAX_UPLOAD_BYTES // 2**20} MB limit")
        try:
            image = decode_image(path.read_bytes(), name="image")
        except ImageDecodeError as exc:
            status = 413 if "pixel limit" in str(exc) else 400
            raise BadInput(status, str(exc)) from None
        if image.format not in ACCEPTED_FORMATS:
            raise BadInput(415, f"image: {image.format} images are not accepted; send JPEG, PNG or WebP")
        return self.pre.pil_to_uint8(image).tobytes()

    @bentoml.api(route="/predict")
    async def predict(
        self,
        image: Path,
        top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K, description="labels per head, most likely first")] = 5,
    ) -> dict[str, Any]:
        """Classify one image (multipart field `image`: JPEG, PNG or WebP); top-k softmax labels per head."""
        try:
            pixels = await asyncio.to_thread(self._pixels, Path(image))
        except BadInput as exc:
            return error_response(exc.status, str(exc))
        encoded = base64.b64encode(pixels).decode("ascii")
        proxy = getattr(self, "to_async", None)  # set by the BentoML server; absent when the class is called directly
        logits = (await proxy.infer([encoded]) if proxy is not None else self.infer([encoded]))[0]
        heads = {h: softmax_top_k(np.asarray(logits[h]), self.labels[h], top_k) for h in self.labels}
        return {"heads": heads, "model": self.tag, "runtime": self.runtime_name}

    # ---- batched: many requests' pixels -> one runtime call ------------------------------------------------
    @bentoml.api(route="/infer", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, pixels: list[str]) -> list[dict[str, list[float]]]:
        """Internal batched step: base64 uint8 (S,S,3) pixels, one per image -> logits per head."""
        s = self.pre.image_size
        try:
            raw = [np.frombuffer(base64.b64decode(p, validate=True), np.uint8) for p in pixels]
            batch = np.stack([r.reshape(s, s, 3) for r in raw])
        except ValueError as exc:  # wrong length or not base64: only a hand-made /infer call gets here
            raise bentoml.exceptions.InvalidArgument(f"pixels must be base64 uint8 {s}x{s}x3 images: {exc}") from None
        logits = self.runtime.run(self.pre.normalize_numpy(batch))
        return [{h: logits[h][i].tolist() for h in self.labels} for i in range(len(batch))]


# Checks the upload's form (415/413/400 with a message) before BentoML parses it; see upload.py.
TransferkitService.add_asgi_middleware(UploadCheck, path="/predict", max_bytes=MAX_UPLOAD_BYTES)
