"""A real `bentoml serve` process on 127.0.0.1: health, metrics, /predict via the client, adaptive batching."""
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.export.tiny import make_tiny_run
from transferkit.errors import TransferkitError
from transferkit.serving import predict_files, resolve_served_model, start_server


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with start_server(exported[0], port=None, log_path=log) as handle:  # a free port
        yield handle
    assert handle.process.poll() is not None  # stopped


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name, data in images.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in images}


def test_health_endpoints_and_metrics(server):
    assert server.url.startswith("http://127.0.0.1:")
    for path in ("/livez", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text


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


def test_a_burst_is_merged_into_batches(server, images):
    """Concurrent requests share runtime calls: the adaptive batch histogram records batches of more than one."""
    def one(_):
        files = {"image": ("c.jpg", images["china.jpg"], "image/jpeg")}
        return httpx.post(server.url + "/predict", files=files, timeout=120).status_code

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [200] * 48  # generous max_latency_ms: no 503 on a 2-core box
    text = httpx.get(server.url + "/metrics").text
    total = sum(float(v) for v in re.findall(r'adaptive_batch_size_sum\{[^}]*method_name="infer"[^}]*\} (\S+)', text))
    calls = sum(float(v) for v in re.findall(r'adaptive_batch_size_count\{[^}]*method_name="infer"[^}]*\} (\S+)', text))
    assert total >= 48 and calls < total, f"{calls} runtime calls for {total} images: no batching"


def test_client_reports_an_unreachable_server(image_files):
    from transferkit.serving.server import free_port

    with pytest.raises(TransferkitError, match="cannot reach the server"):
        predict_files([image_files["china.jpg"]], f"http://127.0.0.1:{free_port()}")


def test_serve_refuses_a_run_that_was_not_exported(tmp_path):
    run_dir = make_tiny_run(tmp_path / "never-exported")
    with pytest.raises(TransferkitError, match="has not been exported"):
        resolve_served_model(run_dir)
    with pytest.raises(TransferkitError, match="has not been exported"):
        start_server(run_dir)
