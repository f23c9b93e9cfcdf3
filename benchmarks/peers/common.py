"""What every peer server shares: the model file, the run's preprocessing and labels, read from $PEER_CONFIG
(written by benchmarks/serve_peers.py), and the same work per image that transferkit does: decode, RGB,
bilinear resize, /255, mean/std, NCHW, ONNX Runtime on the batch, top-5 softmax labels per head.

Imports only numpy, Pillow and onnxruntime: it runs in each peer's own virtual environment."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image

CONFIG = json.loads(os.environ["PEER_CONFIG"])
SIZE = int(CONFIG["image_size"])
MEAN = np.asarray(CONFIG["mean"], np.float32)
STD = np.asarray(CONFIG["std"], np.float32)
HEADS: dict[str, list[str]] = CONFIG["heads"]
MAX_BATCH = int(CONFIG["max_batch"])
WORKERS = int(CONFIG["workers"])


def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(CONFIG["threads"])  # workers x threads = the cores, as for transferkit
    options.inter_op_num_threads = 1
    return ort.InferenceSession(CONFIG["model"], options, providers=["CPUExecutionProvider"])


def pixels(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def decode(data: bytes) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(data)))


def classify(sess: ort.InferenceSession, batch: np.ndarray) -> list[dict]:
    x = (batch.astype(np.float32) * (1 / 255.0) - MEAN) / STD
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
    answers: list[dict] = [{"heads": {}} for _ in range(len(batch))]
    for head, labels in HEADS.items():
        logits = outputs[head].astype(np.float64)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        for i, row in enumerate(p):
            top = np.argsort(-row, kind="stable")[:5]
            answers[i]["heads"][head] = [{"label": labels[j], "score": round(float(row[j]), 6)} for j in top]
    return answers
