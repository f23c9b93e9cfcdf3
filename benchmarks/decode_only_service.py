"""A BentoML service that decodes uploads and runs no model: the baseline in benchmarks/serve_load.py.

    DECODE_ONLY_IMAGE_SIZE=64 python -m bentoml serve decode_only_service:DecodeOnlyService --working-dir benchmarks

One worker (DECODE_ONLY_WORKERS=N for more) and a plain `@bentoml.api` with a file input: BentoML parses the multipart body (writing the upload
to a temporary file), Pillow opens, decodes and resizes it as a model server must, and the answer is tiny.
Whatever a model server adds on top of this costs throughput, so this is the yardstick a one-worker BentoML
API sets on the same machine.
"""

import os
from pathlib import Path

import bentoml
from PIL import Image

# The model's input side, so the resize costs what it costs in front of the real model.
IMAGE_SIZE = int(os.environ.get("DECODE_ONLY_IMAGE_SIZE", "64"))
WORKERS = int(os.environ.get("DECODE_ONLY_WORKERS", "1"))


@bentoml.service(name="decode_only", workers=WORKERS)
class DecodeOnlyService:
    @bentoml.api
    def predict(self, image: Path) -> dict:
        with Image.open(image) as opened:
            opened.load()  # Image.open only reads the header; the decode happens here
            resized = opened.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return {"size": list(resized.size)}
