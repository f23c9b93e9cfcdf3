"""Real Open Inference Protocol clients against a real `transferkit serve` on 127.0.0.1 with an API key:
Triton's `tritonclient.http` (health, metadata, config, infer with BYTES and FP32 in JSON and binary, the
classification extension) and KServe's `InferenceRESTClient` (health, infer in binary and JSON). Each gets the
top-1 that POST /predict gives for the same real image files; the protocol's infer shares /predict's admission.
(perf_analyzer, Triton's load tool, is a native binary that needs glibc 2.38 and is not run here.)"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from transferkit.manifest import read_manifest
from transferkit.serving import start_server

KEY = "v2-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}  # pass copies: tritonclient adds its own headers to the dict it gets
IMAGES = ("china.jpg", "digit.png", "china.webp")
KSERVE_PYTHON = Path(__file__).parents[2] / ".venv-kserve" / "bin" / "python"


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2-server")
    (folder / "key").write_text(KEY)
    with start_server(
        exported[0],
        port=None,
        log_path=folder / "serve.log",
        api_key_file=folder / "key",
        workers=1,
        max_queue=4,
        max_images=4,
    ) as handle:
        yield handle


def _text(item) -> str:
    """A BYTES element as tritonclient gives it: bytes from binary outputs, str from JSON ones."""
    return item.decode() if isinstance(item, bytes) else item


def _name(server) -> str:
    return server.tag.split(":")[0]


def _predict(server, data: bytes, content_type: str, expect: int | None = 200) -> dict:
    response = httpx.post(server.url + "/predict", content=data, headers={**AUTH, "Content-Type": content_type})
    if expect is not None:
        assert response.status_code == expect, response.text
    return response.json()


@pytest.fixture(scope="module")
def top1(server, images) -> dict[str, dict[str, str]]:
    """image name -> head -> the label /predict ranks first."""
    types = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
    out = {}
    for name in IMAGES:
        heads = _predict(server, images[name], types[name.rsplit(".", 1)[1]])["heads"]
        out[name] = {head: labels[0]["label"] for head, labels in heads.items()}
    return out


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(
        server.url.removeprefix("http://"), connection_timeout=30, network_timeout=60
    )
    yield client
    client.close()


def test_tritonclient_reads_health_metadata_and_config(triton, server):
    assert triton.is_server_live() and triton.is_server_ready()
    name = _name(server)
    assert triton.is_model_ready(name)
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    meta = triton.get_model_metadata(name, headers=dict(AUTH))
    assert {i["name"] for i in meta["inputs"]} == {"image", "tensor"}
    config = triton.get_model_config(name, headers=dict(AUTH))
    assert config["max_batch_size"] >= len(IMAGES) - 1 and config["output"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_with_image_files_gives_predicts_top1(triton, server, images, top1, binary):
    import tritonclient.http as httpclient

    name = _name(server)
    heads = list(top1[IMAGES[0]])
    for pair in (IMAGES[:2], IMAGES[2:]):  # two requests of up to 2 images
        files = [images[n] if binary else base64.b64encode(images[n]) for n in pair]
        image = httpclient.InferInput("image", [len(pair)], "BYTES")
        image.set_data_from_numpy(np.array(files, dtype=np.object_), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(f"{h}.labels", binary_data=binary) for h in heads]
        outputs += [httpclient.InferRequestedOutput(f"{heads[0]}.logits", binary_data=binary, class_count=1)]
        result = triton.infer(
            name, [image], outputs=outputs, headers=dict(AUTH), parameters={"top_k": 2}, request_id="t1"
        )
        assert result.get_response()["id"] == "t1"
        for h in heads:
            labels = result.as_numpy(f"{h}.labels")
            assert labels.shape == (len(pair), 2)
            assert [_text(row[0]) for row in labels] == [top1[n][h] for n in pair]
        classified = result.as_numpy(f"{heads[0]}.logits")  # "logit:index:label"
        assert [_text(row[0]).split(":", 2)[2] for row in classified] == [top1[n][heads[0]] for n in pair]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_with_a_preprocessed_tensor(triton, server, exported, images, top1, binary):
    import tritonclient.http as httpclient

    pre = read_manifest(exported[0] / "export").preprocessing
    pixels = np.stack([pre.decode_served(images[n], n) for n in IMAGES[:2]])
    tensor = pre.normalize_numpy(pixels)
    x = httpclient.InferInput("tensor", list(tensor.shape), "FP32")
    x.set_data_from_numpy(tensor, binary_data=binary)
    heads = list(top1[IMAGES[0]])
    outputs = [httpclient.InferRequestedOutput(f"{h}.logits", binary_data=binary) for h in heads]
    outputs += [httpclient.InferRequestedOutput(f"{h}.labels", binary_data=binary) for h in heads]
    result = triton.infer(_name(server), [x], outputs=outputs, headers=dict(AUTH))
    for h in heads:
        assert result.as_numpy(f"{h}.logits").dtype == np.float32
        assert [_text(row[0]) for row in result.as_numpy(f"{h}.labels")] == [top1[n][h] for n in IMAGES[:2]]


def test_tritonclient_gets_the_protocols_errors(triton, server, images):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([images["digit.png"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="API key") as caught:
        triton.infer(_name(server), [image])
    assert caught.value.status() == "401"
    with pytest.raises(InferenceServerException, match="unknown model") as caught:
        triton.infer("no-such-model", [image], headers=dict(AUTH))
    assert caught.value.status() == "404"
    many = httpclient.InferInput("image", [5], "BYTES")  # over the 4 images a request may carry
    many.set_data_from_numpy(np.array([images["digit.png"]] * 5, dtype=np.object_))
    with pytest.raises(InferenceServerException, match="over the limit") as caught:
        triton.infer(_name(server), [many], headers=dict(AUTH))
    assert caught.value.status() == "413"


def test_v2_infer_and_predict_share_one_admission_limit(server, images):
    """A burst of both protocols at once against a worker that admits 4 images: the refusals are 503 with
    Retry-After on either route, everything else is answered."""
    import asyncio

    url = f"{server.url}/v2/models/{_name(server)}/infer"
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [4],
                "data": [base64.b64encode(images["china.jpg"]).decode()] * 4,
            }
        ]
    }

    async def burst() -> list[tuple[str, httpx.Response]]:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60, headers=dict(AUTH)) as client:
            v2 = [client.post(url, json=body) for _ in range(16)]
            raw = {**AUTH, "Content-Type": "image/jpeg"}
            predict = [
                client.post(server.url + "/predict", content=images["china.jpg"], headers=raw) for _ in range(16)
            ]
            answers = await asyncio.gather(*v2, *predict)
        return [("v2" if i < 16 else "predict", r) for i, r in enumerate(answers)]

    answers = asyncio.run(burst())
    assert {r.status_code for _, r in answers} <= {200, 503}, [
        r.text for _, r in answers if r.status_code not in (200, 503)
    ]
    refused = [(route, r) for route, r in answers if r.status_code == 503]
    assert refused, "32 requests at once never met the 4-image limit"
    assert "v2" in {route for route, _ in refused} and all(int(r.headers["Retry-After"]) >= 1 for _, r in refused)
    assert "capacity" in refused[0][1].json()["error"]


def test_kserves_rest_client_gets_predicts_top1(server, images, top1, tmp_path):
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: `make setup` builds KServe's client venv (make clients)")
    paths = []
    for name in IMAGES[:2]:
        (tmp_path / name).write_bytes(images[name])
        paths.append(str(tmp_path / name))
    heads = list(top1[IMAGES[0]])
    wanted = [f"{h}.labels" for h in heads] + [f"{heads[0]}.scores"]
    script = Path(__file__).with_name("clients") / "kserve_v2.py"
    args = [str(KSERVE_PYTHON), str(script), server.url, _name(server), KEY, ",".join(paths), ",".join(wanted)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["health"] == {"live": True, "ready": True, "model_ready": True}
    for encoding in ("binary", "json"):
        answer = got[encoding]
        assert answer["id"] == "kserve-1"
        for h in heads:
            assert [row[0] for row in answer["outputs"][f"{h}.labels"]] == [top1[n][h] for n in IMAGES[:2]]
        scores = np.array(answer["outputs"][f"{heads[0]}.scores"])
        assert scores.shape == (2, 5) and (np.diff(scores, axis=1) <= 0).all()
