"""KServe's own REST client (the `kserve` package, protocol v2) against a transferkit server. Runs in the
KServe client's venv (`make setup` builds .venv-kserve: kserve pins protobuf, pandas and psutil below what
transferkit uses), so it is a script the test starts, printing what it got as JSON.

    .venv-kserve/bin/python kserve_v2.py URL MODEL KEY IMAGE,IMAGE,... OUTPUT,OUTPUT,...
"""

import asyncio
import base64
import json
import sys
from pathlib import Path

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


async def main(url: str, model: str, key: str, paths: list[str], wanted: list[str]) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        health = {
            "live": await client.is_server_live(url, headers=headers),
            "ready": await client.is_server_ready(url, headers=headers),
            "model_ready": await client.is_model_ready(url, model, headers=headers),
        }
        files = np.array([Path(p).read_bytes() for p in paths], dtype=np.object_)
        answers = {}
        for binary in (True, False):
            image = InferInput(name="image", shape=[len(paths)], datatype="BYTES")
            if binary:
                image.set_data_from_numpy(files, binary_data=True)
            else:  # JSON: each file base64-encoded, as the protocol's JSON strings must be text
                image.set_data_from_numpy(
                    np.array([base64.b64encode(f) for f in files], dtype=np.object_), binary_data=False
                )
            outputs = [RequestedOutput(name, {"binary_data": binary}) for name in wanted]
            request = InferRequest(
                model_name=model, infer_inputs=[image], request_id="kserve-1", request_outputs=outputs
            )
            got: dict = {}  # the answer's headers (the client's parser drops the body's model_version)
            response = await client.infer(
                url, request, model_name=model, headers=dict(headers), response_headers=got
            )  # it adds to the headers dict it is given
            answers["binary" if binary else "json"] = {
                "id": response.id,
                "model_version": got.get("x-model-version"),
                "outputs": {o.name: _plain(o.as_numpy()) for o in response.outputs},
            }
        return {"health": health, **answers}
    finally:
        await client.close()


def _plain(array: np.ndarray) -> list:
    if array.dtype == np.object_:
        return [[x.decode() if isinstance(x, bytes) else x for x in row] for row in array.tolist()]
    return array.tolist()


if __name__ == "__main__":
    url, model, key, images, wanted = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    print(json.dumps(asyncio.run(main(url, model, key, images.split(","), wanted.split(",")))))
