"""The BentoML service in-process (ASGI test client): real images in, top-k per head out; bad input -> 4xx."""
import asyncio
import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.serving.conftest import encode


def _post(client, name, data, mime="image/jpeg", **form):
    return client.post("/predict", files={"image": (name, data, mime)}, data={k: str(v) for k, v in form.items()})


@pytest.mark.parametrize("name, mime", [("china.jpg", "image/jpeg"), ("china.webp", "image/webp"),
                                        ("digit.png", "image/png")])  # fmt: skip
def test_predict_answers_top_k_per_head(client, images, exported, name, mime):
    response = _post(client, name, images[name], mime, top_k=3)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == exported[1].bentoml_tag and body["runtime"].startswith("onnxruntime")
    assert set(body["heads"]) == {"digits", "fashion-mnist"}
    for preds in body["heads"].values():
        assert len(preds) == 3
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert {p["label"] for p in body["heads"]["digits"]} <= {str(i) for i in range(10)}


def test_default_top_k_is_5_and_large_k_gives_every_class(client, images):
    assert len(_post(client, "c.jpg", images["china.jpg"]).json()["heads"]["digits"]) == 5
    preds = _post(client, "c.jpg", images["china.jpg"], top_k=50).json()["heads"]["fashion-mnist"]
    assert len(preds) == 10 and abs(sum(p["score"] for p in preds) - 1.0) < 1e-4


def test_same_image_same_answer_through_the_batching_path(client, images):
    a = _post(client, "d.png", images["digit.png"], "image/png").json()
    b = _post(client, "d.png", images["digit.png"], "image/png").json()
    assert a == b


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("not an image", 400, "not a recognised image"),
        ("empty", 400, "empty file"),
        ("truncated", 400, "truncated"),
        ("gif", 415, "GIF"),
        ("huge", 413, "pixel limit"),
        ("wrong field", 400, "unknown form field"),
        ("no file", 415, "multipart/form-data"),
        ("raw body", 415, "multipart/form-data"),
        ("two images", 400, "one image per request"),
        ("top_k 0", 400, "top_k"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_problem_and_serving_continues(client, images, case, status, words):
    jpg = images["china.jpg"]
    china = Image.open(io.BytesIO(jpg))
    requests = {
        "not an image": lambda: _post(client, "notes.txt", b"just some text", "text/plain"),
        "empty": lambda: _post(client, "empty.jpg", b""),
        "truncated": lambda: _post(client, "half.jpg", jpg[: len(jpg) // 2]),
        "gif": lambda: _post(client, "c.gif", encode(china, "GIF"), "image/gif"),
        "huge": lambda: _post(client, "big.png", encode(Image.new("1", (9000, 9000)), "PNG"), "image/png"),
        "wrong field": lambda: client.post("/predict", files={"file": ("c.jpg", jpg, "image/jpeg")}),
        "no file": lambda: client.post("/predict", data={"top_k": "3"}),
        "raw body": lambda: client.post("/predict", content=jpg, headers={"content-type": "image/jpeg"}),
        "two images": lambda: client.post("/predict", files=[("image", ("a.jpg", jpg)), ("image", ("b.jpg", jpg))]),
        "top_k 0": lambda: _post(client, "c.jpg", jpg, top_k=0),
    }
    response = requests[case]()
    assert response.status_code == status, response.text
    assert words in str(response.json()["error"]) + str(response.json().get("detail", ""))
    assert _post(client, "c.jpg", jpg).status_code == 200  # still serving


def test_health_endpoints(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_class_called_directly_without_a_server(service_class, images, tmp_path):
    """The BentoML-examples first level: instantiate the class and call the API methods as Python."""
    service = service_class()
    path = tmp_path / "digit.png"
    path.write_bytes(images["digit.png"])
    body = asyncio.run(service.predict(Path(path), top_k=2))
    assert len(body["heads"]["digits"]) == 2
    logits = service.infer([base64.b64encode(bytes(32 * 32 * 3)).decode()])
    assert len(logits) == 1 and len(logits[0]["fashion-mnist"]) == 10
