"""A real `transferkit serve` on 127.0.0.1 used as clients use it: many at once. Health, metrics, the client,
a concurrent burst answered in full with batched runtime calls, and the OpenAPI document checked by an
OpenAPI-driven fuzzer against the live server."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.export.tiny import make_tiny_run
from tests.serving.conftest import concurrent_posts
from transferkit.errors import TransferkitError
from transferkit.serving import predict_files, resolve_served_model, start_server


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with start_server(exported[0], port=None, log_path=log) as handle:  # a free port, default settings
        yield handle
    assert handle.process.poll() is not None  # stopped


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in images}


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_health_endpoints_and_metrics(server, images):
    """BentoML's per-request middleware is off by default; /metrics still counts answers by status."""
    assert server.url.startswith("http://127.0.0.1:")
    for path in ("/livez", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200
    before = _metric(httpx.get(server.url + "/metrics").text, 'transferkit_requests_total{status="200"}')
    answer = httpx.post(server.url + "/predict", content=images["digit.png"], headers={"Content-Type": "image/png"})
    metrics = httpx.get(server.url + "/metrics")
    assert answer.status_code == 200 and metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert _metric(metrics.text, 'transferkit_requests_total{status="200"}') == before + 1


def test_the_served_process_runs_uvicorns_fast_stack(server, images):
    """uvloop and httptools are dependencies; each worker reports what it really runs (serving/stack.py)."""
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'^transferkit_http_stack\{loop="uvloop",parser="httptools\+coalesced"\} 1\.0$', metrics, re.M), (
        metrics
    )
    assert "HTTP: uvloop loop, httptools+coalesced parser" in server.log_tail()
    raw = httpx.post(server.url + "/predict", content=images["digit.png"], headers={"Content-Type": "image/png"})
    form = httpx.post(server.url + "/predict", files={"image": ("d.png", images["digit.png"], "image/png")})
    assert raw.status_code == form.status_code == 200 and raw.json() == form.json()


def test_predict_files_through_the_client(server, image_files, exported):
    results = predict_files([image_files["china.jpg"], image_files["digit.png"]], server.url, top_k=2)
    assert [r["file"] for r in results] == [str(image_files["china.jpg"]), str(image_files["digit.png"])]
    for r in results:
        assert r["model"] == exported[1].bentoml_tag and len(r["heads"]["digits"]) == 2


def test_client_quotes_the_servers_error_and_server_keeps_serving(server, tmp_path, image_files):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    with pytest.raises(TransferkitError, match=r"notes.jpg: the server answered 400: .*not a recognised image"):
        predict_files([bad], server.url)
    with pytest.raises(TransferkitError, match="top_k"):
        predict_files([image_files["china.jpg"]], server.url, top_k=0)
    assert predict_files([image_files["china.jpg"]], server.url)[0]["heads"]


def test_a_burst_of_200_concurrent_requests_is_answered_in_full_and_batched(server, images):
    before = httpx.get(server.url + "/metrics").text
    responses = [r for r, _ in concurrent_posts(server.url, 200, images["digit.png"])]
    assert [r.status_code for r in responses] == [200] * 200
    assert len({r.text for r in responses}) == 1  # the same image gets the same answer in every batch
    after = httpx.get(server.url + "/metrics").text
    images_run = _metric(after, "transferkit_batch_size_sum") - _metric(before, "transferkit_batch_size_sum")
    calls = _metric(after, "transferkit_batch_size_count") - _metric(before, "transferkit_batch_size_count")
    assert images_run == 200 and calls < images_run / 2, f"{calls:g} runtime calls for 200 images: no batching"


def test_the_openapi_document_holds_under_an_openapi_driven_fuzzer(server):
    """schemathesis generates requests from /docs.json and checks every answer against it (status codes,
    content types, bodies, headers). Excluded: `positive_data_acceptance`, which expects any schema-valid
    request to succeed; a schema cannot say "these bytes decode as an image", so random bytes get a 400. And the
    repository's load and unload (tests/serving/test_repository.py): an unload in the middle of the run would
    take the model away from the requests after it."""
    st = Path(sys.executable).with_name("st")
    config = Path(__file__).with_name("schemathesis.toml")
    proc = subprocess.run(
        [
            str(st),
            "--config-file",
            str(config),
            "run",
            server.url + "/docs.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--exclude-path-regex",
            "^/v2/repository/models/",
            "--max-examples",
            "60",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", proc.stdout), proc.stdout[-2000:]


def test_client_reports_an_unreachable_server(image_files):
    from transferkit.serving.processes import free_port

    with pytest.raises(TransferkitError, match="cannot reach the server"):
        predict_files([image_files["china.jpg"]], f"http://127.0.0.1:{free_port()}")


def test_serve_refuses_a_run_that_was_not_exported(tmp_path):
    run_dir = make_tiny_run(tmp_path / "never-exported")
    with pytest.raises(TransferkitError, match="has not been exported"):
        resolve_served_model(run_dir)
    with pytest.raises(TransferkitError, match="has not been exported"):
        start_server(run_dir)


def test_serve_refuses_a_model_file_changed_in_the_store(exported, tmp_path):
    """A copy of the model store with one byte of model.onnx changed: `transferkit serve` refuses to start,
    naming the file, both hashes and the re-export command."""
    import os

    from transferkit.runtimes.resolve import stored_model_path

    model_dir = stored_model_path(exported[1].bentoml_tag)
    home = Path(os.environ["BENTOML_HOME"])
    store = shutil.copytree(home / "models", tmp_path / "bentoml" / "models")
    tampered = store / model_dir.relative_to(home / "models") / "model.onnx"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    proc = subprocess.run(
        [sys.executable, "-m", "transferkit", "serve", str(exported[0]), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")},
    )
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip()
    assert "model.onnx" in error and "sha256" in error and "transferkit export" in error
    assert len(re.findall(r"[0-9a-f]{64}", error)) >= 2  # expected and actual


def test_bentomls_access_log_still_sees_predict_when_asked_for(exported, images, tmp_path):
    """By default POST /predict is answered in front of BentoML's middleware (protocol.py); with the access log
    on it is answered inside it, so the log has its line. Last in this file: a second server on the same
    BentoML home starts /metrics afresh for every server there, which the burst test above reads."""
    with start_server(exported[0], log_path=tmp_path / "serve.log", workers=1, access_log=True) as handle:
        answer = httpx.post(handle.url + "/predict", content=images["digit.png"], headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.json()["heads"]
        log = handle.log_tail(400)
    assert re.search(r"method=POST,path=/predict.*status=200", log), log
