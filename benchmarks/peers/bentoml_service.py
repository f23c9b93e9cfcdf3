"""Plain BentoML serving the same ONNX file: the documented way, a batchable `@bentoml.api` taking PIL images
(multipart field `images`), BentoML's adaptive batching, $PEER workers.

    PEER_CONFIG=... bentoml serve bentoml_service:Plain --host 127.0.0.1 --port 3000   (POST /predict)"""
from __future__ import annotations

import bentoml
import numpy as np
from PIL.Image import Image

import common


@bentoml.service(workers=common.WORKERS)
class Plain:
    def __init__(self) -> None:
        self.session = common.session()

    @bentoml.api(batchable=True, max_batch_size=common.MAX_BATCH, max_latency_ms=10_000)
    def predict(self, images: list[Image]) -> list[dict]:
        return common.classify(self.session, np.stack([common.pixels(im) for im in images]))
