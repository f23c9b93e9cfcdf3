"""The service in-process (ASGI test client): real images in, top-k per head out, in request order; every
kind of bad input gets a 4xx JSON error with a request id, and the service keeps answering."""

import asyncio
import base64
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.serving.conftest import encode


def _post(client, name, data, mime="image/jpeg", **form):
    return client.post("/predict", files={"image": (name, data, mime)}, data={k: str(v) for k, v in form.items()})


@pytest.mark.parametrize(
    "name, mime", [("china.jpg", "image/jpeg"), ("china.webp", "image/webp"), ("digit.png", "image/png")]
)
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
    assert response.headers["x-request-id"]


def test_default_top_k_is_5_and_large_k_gives_every_class(client, images):
    assert len(_post(client, "c.jpg", images["china.jpg"]).json()["heads"]["digits"]) == 5
    preds = _post(client, "c.jpg", images["china.jpg"], top_k=50).json()["heads"]["fashion-mnist"]
    assert len(preds) == 10 and abs(sum(p["score"] for p in preds) - 1.0) < 1e-4


def _singles(client, images, order):
    return [_post(client, n, images[n]).json()["heads"] for n in order]


def test_repeated_images_field_answers_a_list_in_request_order(client, images):
    order = ["digit.png", "china.jpg", "china.webp", "digit.png"]
    response = client.post("/predict", files=[("images", (n, images[n])) for n in order])
    assert response.status_code == 200, response.text
    assert [p["heads"] for p in response.json()["predictions"]] == _singles(client, images, order)


def test_json_base64_images_answer_in_order(client, images):
    order = ["china.webp", "digit.png", "china.jpg"]
    encoded = [base64.b64encode(images[n]).decode() for n in order]
    encoded[1] = "data:image/png;base64," + encoded[1]  # a data URI is accepted too
    response = client.post("/predict", json={"images": encoded, "top_k": 5})
    assert response.status_code == 200, response.text
    assert [p["heads"] for p in response.json()["predictions"]] == _singles(client, images, order)
    one = client.post("/predict", json={"image": base64.b64encode(images["digit.png"]).decode()})
    assert one.json()["heads"] == _singles(client, images, ["digit.png"])[0]


@pytest.mark.parametrize(
    "name, mime", [("china.jpg", "image/jpeg"), ("china.webp", "image/webp"), ("digit.png", "image/png")]
)
def test_a_raw_image_body_answers_like_multipart(client, images, name, mime):
    """curl --data-binary @a.jpg -H 'Content-Type: image/jpeg' URL/predict?top_k=3: the same answer as -F image=@."""
    raw = client.post("/predict", content=images[name], headers={"content-type": mime}, params={"top_k": "3"})
    assert raw.status_code == 200, raw.text
    form = _post(client, name, images[name], mime, top_k=3)
    assert raw.json() == form.json() and len(raw.json()["heads"]["digits"]) == 3
    default = client.post("/predict", content=images[name], headers={"content-type": mime + "; charset=binary"})
    assert len(default.json()["heads"]["digits"]) == 5  # parameters on the type are ignored; top_k defaults to 5


def _png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims another size (with a valid CRC): a decompression bomb's header."""
    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


BAD_UPLOADS = {
    # case: (request kwargs builder, status, words in the error)
    "not an image": (
        lambda im: {"files": {"image": ("notes.txt", b"just some text", "text/plain")}},
        400,
        "not a recognised image",
    ),
    "empty": (lambda im: {"files": {"image": ("e.jpg", b"")}}, 400, "empty file"),
    "truncated": (lambda im: {"files": {"image": ("h.jpg", im["china.jpg"][:3000])}}, 400, "truncated"),
    "gif": (lambda im: {"files": {"image": ("c.gif", encode(Image.new("RGB", (8, 8)), "GIF"))}}, 415, "GIF"),
    "tiff": (lambda im: {"files": {"image": ("c.tif", encode(Image.new("RGB", (8, 8)), "TIFF"))}}, 415, "TIFF"),
    "dds": (lambda im: {"files": {"image": ("c.dds", encode(Image.new("RGBA", (8, 8)), "DDS"))}}, 415, "DDS"),
    "ico": (lambda im: {"files": {"image": ("c.ico", encode(Image.new("RGB", (16, 16)), "ICO"))}}, 415, "ICO"),
    "eps": (
        lambda im: {"files": {"image": ("c.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")}},
        415,
        "EPS",
    ),
    "svg": (lambda im: {"files": {"image": ("c.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')}}, 415, "SVG"),
    "200 megapixels": (lambda im: {"files": {"image": ("b.png", _png_claiming(20000, 10000))}}, 413, "pixel limit"),
    "64+ megapixels": (lambda im: {"files": {"image": ("b.png", _png_claiming(9000, 9000))}}, 413, "pixel limit"),
    "wrong field": (lambda im: {"files": {"file": ("c.jpg", im["china.jpg"])}}, 400, "unknown form field"),
    "form without a file": (lambda im: {"data": {"top_k": "3"}}, 415, "multipart/form-data"),
    "no image field": (lambda im: {"files": {"top_k": (None, "3")}}, 400, "no image"),
    "text in image field": (lambda im: {"files": {"image": (None, "photo.jpg")}}, 400, "must be a file upload"),
    "raw body of another type": (
        lambda im: {"content": im["china.jpg"], "headers": {"content-type": "image/gif"}},
        415,
        "image/jpeg",
    ),
    "raw body, no content type": (lambda im: {"content": im["china.jpg"]}, 415, "--data-binary"),
    "raw body empty": (lambda im: {"content": b"", "headers": {"content-type": "image/png"}}, 400, "body is empty"),
    "raw body corrupt": (
        lambda im: {"content": im["china.jpg"][:3000], "headers": {"content-type": "image/jpeg"}},
        400,
        "truncated",
    ),
    "raw body of a GIF": (
        lambda im: {"content": encode(Image.new("RGB", (8, 8)), "GIF"), "headers": {"content-type": "image/png"}},
        415,
        "GIF",
    ),
    "raw body, top_k twice": (
        lambda im: {
            "content": im["digit.png"],
            "headers": {"content-type": "image/png"},
            "params": [("top_k", "2"), ("top_k", "3")],
        },
        400,
        "more than once",
    ),
    "raw body, top_k 0": (
        lambda im: {"content": im["digit.png"], "headers": {"content-type": "image/png"}, "params": {"top_k": "0"}},
        400,
        "top_k",
    ),
    "query top_k with a form": (
        lambda im: {"files": {"image": ("c.jpg", im["china.jpg"])}, "params": {"top_k": "2"}},
        400,
        "raw image bodies",
    ),
    "garbage multipart": (
        lambda im: {
            "content": b"--x\r\nno headers here\r\n\x00\xff--",
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
        400,
        "multipart",
    ),
    "two image fields": (
        lambda im: {"files": [("image", ("a.jpg", im["china.jpg"])), ("image", ("b.jpg", im["china.jpg"]))]},
        400,
        "one image per",
    ),
    "image and images": (
        lambda im: {"files": [("image", ("a.jpg", im["china.jpg"])), ("images", ("b.jpg", im["china.jpg"]))]},
        400,
        "not both",
    ),
    "too many images": (lambda im: {"files": [("images", ("d.png", im["digit.png"]))] * 33}, 413, "over the limit"),
    "top_k 0": (lambda im: {"files": {"image": ("c.jpg", im["china.jpg"])}, "data": {"top_k": "0"}}, 400, "top_k"),
    "top_k text": (
        lambda im: {"files": {"image": ("c.jpg", im["china.jpg"])}, "data": {"top_k": "many"}},
        400,
        "top_k",
    ),
    "json not an object": (lambda im: {"json": ["a"]}, 400, "must be an object"),
    "json bad base64": (lambda im: {"json": {"images": ["%%%"]}}, 400, "not valid base64"),
    "json unknown field": (lambda im: {"json": {"images": ["AAAA"], "url": "http://x"}}, 400, "unknown JSON field"),
    "json broken": (
        lambda im: {"content": b'{"images": [', "headers": {"content-type": "application/json"}},
        400,
        "does not parse",
    ),
    "json nested 100,000 levels": (  # 200 KB that recursed Python's parser into a 500
        lambda im: {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
        400,
        "nested too deeply",
    ),
    "json one bad image among good": (
        lambda im: {
            "json": {"images": [base64.b64encode(im["digit.png"]).decode(), base64.b64encode(b"GIF89a....").decode()]}
        },
        415,
        "images[1]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_input_gets_a_4xx_naming_the_problem_and_serving_continues(client, images, case):
    build, status, words = BAD_UPLOADS[case]
    response = client.post("/predict", **build(images))
    assert response.status_code == status, response.text
    body = response.json()
    assert words in body["error"] and body["request_id"] == response.headers["x-request-id"]
    assert _post(client, "c.jpg", images["china.jpg"]).status_code == 200  # still serving


def test_a_client_request_id_is_echoed(client, images):
    response = client.post("/predict", files={"image": ("e.jpg", b"")}, headers={"X-Request-ID": "abc-123"})
    assert response.json()["request_id"] == "abc-123" == response.headers["x-request-id"]


def test_health_endpoints(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_openapi_documents_predict_with_every_status_and_the_error_body(client):
    spec = client.get("/docs.json").json()
    operation = spec["paths"]["/predict"]["post"]
    assert set(operation["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
        "image/jpeg",
        "image/png",
        "image/webp",
    }
    assert [p["name"] for p in operation["parameters"]] == ["top_k"]  # the raw body's top_k, in the query
    assert {"200", "400", "413", "415", "500", "503", "504"} <= set(operation["responses"])
    assert "Retry-After" in operation["responses"]["503"]["headers"]
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]
    assert "/infer" not in spec["paths"]  # no internal batching route


def test_class_called_directly_without_a_server(service_class, images):
    """The BentoML-examples first level: instantiate the class and call it as Python."""
    service = service_class()
    answers = asyncio.run(service.classify([images["digit.png"], images["china.jpg"]], top_k=2))
    assert [len(a["heads"]["digits"]) for a in answers] == [2, 2]


def test_wrong_method_gets_a_json_405(client):
    response = client.get("/predict")
    assert response.status_code == 405 and response.json()["error"] and "POST" in response.headers["allow"]


@pytest.fixture
def live_service(client):
    """The service instance behind the in-process client (to break it on purpose, then restore it)."""
    import bentoml

    return bentoml.get_current_service()


def test_a_runtime_failure_is_a_json_500_with_a_request_id_and_the_service_goes_on(
    client, images, live_service, monkeypatch, caplog
):
    def broken(batch):
        raise RuntimeError("simulated engine failure")

    monkeypatch.setattr(live_service._only.runtime, "run", broken)
    response = _post(client, "d.png", images["digit.png"], "image/png")
    assert response.status_code == 500
    request_id = response.json()["request_id"]
    assert request_id in response.json()["error"] and "simulated engine failure" not in response.text
    assert "simulated engine failure" in caplog.text  # the traceback is in the server log
    monkeypatch.undo()
    assert _post(client, "d.png", images["digit.png"], "image/png").status_code == 200


def test_a_request_past_the_deadline_gets_a_json_504(client, images, live_service, monkeypatch):
    import dataclasses
    import time

    run = live_service._only.runtime.run
    monkeypatch.setattr(live_service, "settings", dataclasses.replace(live_service.settings, timeout_s=0.3))
    monkeypatch.setattr(live_service._only.runtime, "run", lambda batch: (time.sleep(1.0), run(batch))[1])
    response = _post(client, "d.png", images["digit.png"], "image/png")
    assert response.status_code == 504 and "0.3 s" in response.json()["error"]
    monkeypatch.undo()
    time.sleep(1.0)  # let the abandoned slow call finish
    assert _post(client, "d.png", images["digit.png"], "image/png").status_code == 200


def test_at_capacity_a_request_is_refused_at_once_with_retry_after(client, images, live_service):
    import time

    with live_service.budget.admit(live_service.settings.max_queue):  # every slot taken
        start = time.perf_counter()
        response = _post(client, "d.png", images["digit.png"], "image/png")
        elapsed = time.perf_counter() - start
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert "capacity" in response.json()["error"] and elapsed < 0.1
    assert _post(client, "d.png", images["digit.png"], "image/png").status_code == 200  # slots released


def test_score_gives_each_file_the_answer_predict_gives(client, exported, images, tmp_path):
    """`transferkit score` and POST /predict: the same artifact, decode, preprocessing and ranking per file."""
    from transferkit.scoring.job import score

    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    rows = {Path(r["path"]).name: r for r in score(exported[0], [str(tmp_path)], top_k=4)}
    assert sorted(rows) == sorted(images)
    for name, data in images.items():
        answer = client.post("/predict", files={"image": (name, data)}, data={"top_k": "4"}).json()
        for head, labels in answer["heads"].items():
            assert rows[name][f"{head}_labels"] == [a["label"] for a in labels], (name, head)
            assert rows[name][f"{head}_scores"] == pytest.approx([a["score"] for a in labels], abs=2e-6)


def test_an_image_over_the_models_pixel_limit_is_refused_before_it_is_decoded(
    client, images, live_service, monkeypatch
):
    """A one-colour lossless WebP of 3000x3000 is a few KB; for a 32 px model its 9 MP are over the 4.2 MP that
    the model's side allows: 413 saying so, and no pixel is decoded. One of 2000x2000 answers."""
    from transferkit.preprocess import served_pixel_limit

    assert live_service._only.max_pixels == served_pixel_limit(32) == 2048 * 2048
    decoded = []
    real = live_service._pixels
    monkeypatch.setattr(
        live_service, "_pixels", lambda image, name, *model: (decoded.append(image.size), real(image, name, *model))[1]
    )
    bomb = encode(Image.new("RGB", (3000, 3000), (200, 30, 30)), "WEBP", lossless=True)
    assert len(bomb) < 4096
    response = _post(client, "bomb.webp", bomb, "image/webp")
    assert response.status_code == 413, response.text
    assert "3000x3000 as decoded, over this model's limit of 4194304 pixels" in response.json()["error"]
    assert decoded == []
    within = encode(Image.new("RGB", (2000, 2000), (200, 30, 30)), "WEBP", lossless=True)
    assert _post(client, "ok.webp", within, "image/webp").status_code == 200 and decoded == [(2000, 2000)]
    # in a list, one image over the limit refuses the request before any of the others is decoded
    many = [("images", ("d.png", images["digit.png"], "image/png")), ("images", ("b.webp", bomb, "image/webp"))]
    assert client.post("/predict", files=many).status_code == 413 and decoded == [(2000, 2000)]


def test_an_image_is_decoded_on_the_event_loop_only_when_its_header_says_it_is_small(client, live_service, monkeypatch):
    """The decision is taken from the pixels declared, not the bytes: 1500x1500 in a few KB goes to a decode thread,
    and, being over a megapixel, to the one of lower CPU priority, so it takes the CPU others leave."""
    import os
    import threading

    seen = []
    real = live_service._pixels

    def recording(image, name, *model):
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen.append((threading.current_thread().name, nice))
        return real(image, name, *model)

    monkeypatch.setattr(live_service, "_pixels", recording)
    small = encode(Image.new("RGB", (64, 64), (0, 90, 0)), "PNG")
    medium = encode(Image.new("RGB", (600, 600), (0, 90, 0)), "PNG")
    large = encode(Image.new("RGB", (1500, 1500), (0, 90, 0)), "WEBP", lossless=True)
    assert len(large) < 16 << 10  # once decoded inline by its size in bytes
    for name, data, mime in (
        ("s.png", small, "image/png"),
        ("m.png", medium, "image/png"),
        ("l.webp", large, "image/webp"),
    ):
        assert _post(client, name, data, mime).status_code == 200
    (inline, _), (pooled, pooled_nice), (bulk, bulk_nice) = seen
    assert not inline.startswith("transferkit-decode") and pooled.startswith("transferkit-decode_")
    assert bulk.startswith("transferkit-decode-bulk") and bulk_nice == pooled_nice + 10


def test_a_pixel_flood_that_no_worker_could_hold_is_413_and_a_full_byte_budget_is_503(client, images, live_service):
    """Admission by cost: 32 one-colour WebPs of 2000x2000 are a few KB each, within the pixel limit one by one,
    and together more memory to decode than a worker holds for all requests. Another request's bytes count too."""
    flood = encode(Image.new("RGB", (2000, 2000), (5, 5, 90)), "WEBP", lossless=True)
    files = [("images", (f"{i}.webp", flood, "image/webp")) for i in range(32)]
    response = client.post("/predict", files=files)
    assert response.status_code == 413, response.text
    assert "more than a worker holds for all requests (128 MB, passed at images[4])" in response.json()["error"]
    with live_service.budget.admit(1) as other:  # another request holds all but 1 MB of the budget
        other.add_bytes(live_service.budget.max_bytes - (1 << 20))
        response = _post(client, "w.webp", encode(Image.new("RGB", (1000, 1000), (5, 5, 90)), "WEBP"), "image/webp")
        assert response.status_code == 503 and "MB of requests in progress" in response.json()["error"]
    assert live_service.budget.held_bytes == 0  # every request gave its bytes back
    assert _post(client, "d.png", images["digit.png"], "image/png").status_code == 200


def test_a_body_that_trickles_in_gets_408_after_the_grace_period(monkeypatch):
    """Slowloris: a byte now and then held an admission slot for the whole request deadline."""
    import asyncio
    import time

    from transferkit.serving import inputs

    monkeypatch.setattr(inputs, "BODY_GRACE_S", 0.3)

    async def trickle():
        for _ in range(100):
            yield b"x"
            await asyncio.sleep(0.1)

    async def fast():
        yield b"a" * 1000
        yield b"b" * 1000

    start = time.perf_counter()
    with pytest.raises(inputs.ClientError) as refused:
        asyncio.run(inputs.read_body(trickle(), "100", 1 << 20))
    assert refused.value.status == 408 and "arrived too slowly" in str(refused.value)
    assert time.perf_counter() - start < 1.5
    taken = []
    assert asyncio.run(inputs.read_body(fast(), None, 1 << 20, reserve=taken.append)) == b"a" * 1000 + b"b" * 1000
    assert taken == [1000, 1000]
