"""The Open Inference Protocol (v2) routes in-process, on the same ASGI app the server runs: metadata, health,
Triton's config, infer with JSON tensors of both inputs, the same answer as /predict, and each refusal with
the status the protocol's clients read. Real clients against a real server: test_v2_clients.py."""

from __future__ import annotations

import base64
import gzip
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from transferkit.manifest import read_manifest
from transferkit.serving.v2_tensors import OutputTensor, encode_response, parse_request

SHORT_IMAGES = ("digit.png", "china.jpg", "china.webp")


@pytest.fixture(scope="module")
def model(client) -> dict:
    """name, version, metadata of the served model (from GET /v2/models/<name>, the name from /predict)."""
    tag = client.post("/predict", files={"image": ("x.png", _png())}).json()["model"]
    name, version = tag.split(":")
    return {"name": name, "version": version, "meta": client.get(f"/v2/models/{name}").json()}


def _png() -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _infer(client, name: str, inputs: list[dict], **extra):
    return client.post(f"/v2/models/{name}/infer", json={"inputs": inputs, **extra})


def _outputs(response) -> dict[str, dict]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


def test_server_metadata_and_health_answer_as_the_protocol_says(client, model):
    meta = client.get("/v2").json()
    assert meta["name"] == "transferkit" and "binary_tensor_data" in meta["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{model['name']}/ready").status_code == 200
    assert client.get(f"/v2/models/{model['name']}/versions/{model['version']}/ready").status_code == 200


def test_model_metadata_and_triton_config_describe_both_inputs_and_every_head(client, model):
    meta = model["meta"]
    assert meta["versions"] == [model["version"]]
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["image"] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    assert inputs["tensor"]["datatype"] == "FP32" and inputs["tensor"]["shape"][:2] == [-1, 3]
    heads = {o["name"].rsplit(".", 1)[0] for o in meta["outputs"]}
    assert len(heads) == 2 and len(meta["outputs"]) == 6
    config = client.get(f"/v2/models/{model['name']}/config").json()
    assert config["max_batch_size"] >= 1
    assert {i["name"] for i in config["input"]} == {"image", "tensor"}
    assert [o["name"] for o in config["output"]] == [o["name"] for o in meta["outputs"]]
    versioned = client.get(f"/v2/models/{model['name']}/versions/{model['version']}").json()
    assert versioned == meta


def test_infer_with_images_gives_the_labels_and_scores_of_predict(client, model, images):
    names = list(SHORT_IMAGES)
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [len(names)], "data": [_b64(images[n]) for n in names]}]
    out = _outputs(_infer(client, model["name"], inputs, parameters={"top_k": 3}, id="req-1"))
    for i, name in enumerate(names):
        expected = client.post("/predict", files={"image": (name, images[name])}).json()["heads"]
        for head, labels in expected.items():
            got = out[f"{head}.labels"]
            assert got["shape"] == [len(names), 3]
            assert got["data"][i * 3 : i * 3 + 3] == [x["label"] for x in labels[:3]]
            scores = out[f"{head}.scores"]["data"][i * 3 : i * 3 + 3]
            assert scores == pytest.approx([x["score"] for x in labels[:3]], abs=1e-6)
            logits = np.array(out[f"{head}.logits"]["data"]).reshape(out[f"{head}.logits"]["shape"])[i]
            softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            assert softmax.max() == pytest.approx(scores[0], abs=1e-6)  # the logits are the labels' logits


def test_a_preprocessed_tensor_gives_the_logits_of_its_image(client, model, images, exported):
    pre = read_manifest(exported[0] / "export").preprocessing
    pixels = pre.decode_served(images["china.jpg"], "china.jpg")[None]
    tensor = pre.normalize_numpy(pixels)
    from_tensor = _outputs(
        _infer(
            client,
            model["name"],
            [{"name": "tensor", "datatype": "FP32", "shape": list(tensor.shape), "data": tensor.ravel().tolist()}],
        )
    )
    from_image = _outputs(
        _infer(
            client,
            model["name"],
            [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [{"b64": _b64(images["china.jpg"])}]}],
        )
    )
    for name, output in from_tensor.items():
        if name.endswith(".logits"):
            assert output["data"] == pytest.approx(from_image[name]["data"], abs=1e-5)


def test_classification_extension_and_a_chosen_output(client, model, images):
    head = model["meta"]["outputs"][0]["name"].rsplit(".", 1)[0]
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(images["digit.png"])]}]
    requested = [{"name": f"{head}.logits", "parameters": {"classification": 2}}]
    out = _outputs(_infer(client, model["name"], inputs, outputs=requested))
    assert list(out) == [f"{head}.logits"]
    top = out[f"{head}.logits"]
    assert top["datatype"] == "BYTES" and top["shape"] == [1, 2]
    labels = _outputs(_infer(client, model["name"], inputs))[f"{head}.labels"]["data"]
    value, index, label = top["data"][0].split(":", 2)
    assert label == labels[0] and float(value) and index.isdigit()


@pytest.mark.parametrize(
    "datatype, leaf, words", [("BYTES", '"aGk="', "nested deeper than 8"), ("FP32", "0.5", "not a (nested)")]
)
def test_data_nested_a_thousand_levels_is_a_400_not_a_500(client, model, datatype, leaf, words):
    """orjson parses 1,000 levels; the flattening and numpy must not recurse into a RecursionError (a 500)."""
    data = "[" * 1000 + leaf + "]" * 1000
    body = f'{{"inputs": [{{"name": "x", "datatype": "{datatype}", "shape": [1], "data": {data}}}]}}'
    name = "image" if datatype == "BYTES" else "tensor"
    response = client.post(f"/v2/models/{model['name']}/infer", content=body.replace('"x"', f'"{name}"'))
    assert response.status_code == 400 and words in response.json()["error"], response.text


def test_a_json_part_over_its_own_limit_is_refused_before_it_is_parsed(client, model):
    floats = [0.5] * 2_500_000  # 10 MB of JSON that would be about 100 MB of Python floats
    tensor = [{"name": "tensor", "datatype": "FP32", "shape": [len(floats)], "data": floats}]
    response = _infer(client, model["name"], tensor)
    assert response.status_code == 413 and "binary tensor extension" in response.json()["error"], response.text


@pytest.mark.parametrize(
    "inputs, status, words",
    [
        ([{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}], 400, "BYTES with shape"),
        ([{"name": "tensor", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 12}], 400, "shape [N,3,"),
        ([{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}], 400, "send one input"),
        ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}], 400, "not base64"),
        ([{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}], 400, "shape says 2"),
        ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}], 400, "image"),
        ([{"name": "image", "datatype": "BYTES", "shape": [999], "data": []}], 413, "over the limit"),
        ([{"name": "image", "datatype": "STRING", "shape": [1], "data": ["x"]}], 400, "not one of"),
        # malformed past numpy's or Python's own limits: a 400 naming it, never a 500 with a traceback
        ([{"name": "tensor", "datatype": "FP32", "shape": [1] * 65, "data": [0.0]}], 400, "65 dimensions, over 8"),
        ([{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="] * 100_000}], 400, "more elements"),
    ],
)
def test_bad_inputs_are_refused_with_a_sentence_that_names_the_fix(client, model, inputs, status, words):
    response = _infer(client, model["name"], inputs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_unknown_models_versions_outputs_and_bad_bodies_get_protocol_errors(client, model, images):
    good = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(images["digit.png"])]}]
    assert _infer(client, "other-model", good).status_code == 404
    assert client.post(f"/v2/models/{model['name']}/versions/0/infer", json={"inputs": good}).status_code == 404
    assert client.get("/v2/models/other-model/config").status_code == 404
    response = _infer(client, model["name"], good, outputs=[{"name": "nope"}])
    assert response.status_code == 400 and "unknown output" in response.json()["error"]
    response = _infer(client, model["name"], good, parameters={"top_k": 0})
    assert response.status_code == 400 and "top_k" in response.json()["error"]
    response = client.post(f"/v2/models/{model['name']}/infer", content=b"{not json")
    assert response.status_code == 400 and "does not parse" in response.json()["error"]
    headers = {"Inference-Header-Content-Length": "99999"}
    response = client.post(f"/v2/models/{model['name']}/infer", content=b"{}", headers=headers)
    assert response.status_code == 400 and "outside" in response.json()["error"]


def test_outputs_named_twice_or_past_the_bound_are_refused_before_any_work(client, model, images):
    """Output amplification: one output listed 200,000 times was computed and encoded 200,000 times (5 MB in,
    seconds of the event loop). A repeat is a 400 naming it; a list past the bound is refused before it is read."""
    good = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(images["digit.png"])]}]
    name = model["meta"]["outputs"][0]["name"]
    response = _infer(client, model["name"], good, outputs=[{"name": name}, {"name": name}])
    assert response.status_code == 400 and f"output {name!r} is requested twice" in response.json()["error"]
    response = _infer(client, model["name"], good, outputs=[{"name": name}] * 200_000)  # refused before parsing
    assert response.status_code == 400 and "names more than 256 inputs and outputs" in response.json()["error"]
    response = _infer(client, model["name"], good, outputs=[{"name": name}] * 100)
    assert response.status_code == 400 and "100 entries, over 64" in response.json()["error"]
    every = [{"name": o["name"]} for o in model["meta"]["outputs"]]
    assert _infer(client, model["name"], good, outputs=every).status_code == 200  # each once: answered


def test_a_gzip_body_is_read_and_a_decompression_bomb_is_refused(client, model, images):
    body = json.dumps(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(images["digit.png"])]}]}
    )
    response = client.post(
        f"/v2/models/{model['name']}/infer", content=gzip.compress(body.encode()), headers={"Content-Encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    bomb = gzip.compress(b"0" * (30 << 20))
    response = client.post(f"/v2/models/{model['name']}/infer", content=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "decompressed" in response.json()["error"]


def test_binary_tensors_round_trip_through_the_parser_and_the_encoder():
    """The extension's byte layout: BYTES as 4-byte little-endian lengths, FP32 little-endian, row-major."""
    blobs = [b"\x89PNG-one", b"two"]
    raw = b"".join(len(b).to_bytes(4, "little") + b for b in blobs)
    floats = np.arange(6, dtype="<f4").reshape(2, 3)
    header = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}},
            {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": floats.nbytes}},
        ]
    }
    head = json.dumps(header).encode()
    parsed = parse_request(head + raw + floats.tobytes(), str(len(head)), max_images=8)
    assert parsed.inputs[0].value == blobs
    np.testing.assert_array_equal(parsed.inputs[1].value, floats)
    body, json_length = encode_response(
        {"model_name": "m"},
        [
            (OutputTensor("l", "BYTES", np.array([[b"cat"], [b"dog"]], dtype=object)), True),
            (OutputTensor("s", "FP32", np.array([[0.5], [0.25]], np.float32)), True),
        ],
    )
    described = json.loads(body[:json_length])["outputs"]
    assert [o["parameters"]["binary_data_size"] for o in described] == [14, 8]
    rest = body[json_length:]
    assert rest[:14] == b"\x03\x00\x00\x00cat\x03\x00\x00\x00dog"
    np.testing.assert_array_equal(np.frombuffer(rest[14:], "<f4"), [0.5, 0.25])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=512),
    header_length=st.one_of(st.none(), st.integers(-2, 600).map(str), st.text(max_size=5)),
    encoding=st.sampled_from([None, "gzip", "deflate", "br"]),
)
def test_arbitrary_infer_bodies_never_get_a_5xx(client, model, body, header_length, encoding):
    headers = {}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    try:
        response = client.post(f"/v2/models/{model['name']}/infer", content=body, headers=headers)
    except UnicodeEncodeError:  # a header value httpx cannot send
        return
    assert response.status_code in (200, 400, 413, 415), (response.status_code, response.text)
    assert response.status_code == 200 or response.json()["error"]
