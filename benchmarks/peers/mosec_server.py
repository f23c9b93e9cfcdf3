"""mosec serving the same ONNX file: raw image bytes as the request body (mosec's native ingress), one stage of
$PEER workers that decode and run the batch, mosec's own dynamic batching.

    PEER_CONFIG=... python mosec_server.py --address 127.0.0.1 --port 8000   (POST /inference)"""
from __future__ import annotations

import json

import numpy as np
from mosec import Server, Worker

import common


class Classify(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.session = common.session()

    def deserialize(self, data: bytes) -> bytes:  # the body is the image file itself
        return data

    def serialize(self, data: dict) -> bytes:
        return json.dumps(data).encode()

    def forward(self, data: list[bytes]) -> list[dict]:
        return common.classify(self.session, np.stack([common.decode(d) for d in data]))


if __name__ == "__main__":
    server = Server()
    server.append_worker(Classify, num=common.WORKERS, max_batch_size=common.MAX_BATCH, max_wait_time=2)
    server.run()
