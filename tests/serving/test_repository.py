"""A model repository served by a real `transferkit serve DIR` (2 workers, API key) on 127.0.0.1: two models, one
of them in several versions; a new version folder swapped in under concurrent load, a version whose files fail
their sha256 refused, a rollback through tritonclient's repository API, a traffic split, unload and load again.
Every request of the concurrent clients must be answered 200."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.export.tiny import exported_variant
from transferkit.serving import start_server

KEY = "repository-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _stored_dir(run_dir: Path) -> Path:
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.resolve import stored_model_path

    return stored_model_path(read_manifest(run_dir / "export").tag)


@pytest.fixture(scope="module")
def runs(exported, tmp_path_factory) -> dict[str, Path]:
    return {
        "first": exported[0],
        "second": exported_variant(tmp_path_factory, "second", seed=1),
        "broken": exported_variant(tmp_path_factory, "broken", seed=2),
    }


@pytest.fixture(scope="module")
def repo(runs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(runs["first"], root / "tiny")  # a run: the model is named by its tag
    shutil.copytree(runs["first"], root / "digits" / "1")  # <model>/<version>/
    shutil.copytree(runs["second"], root / "digits" / "2")
    return root


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("repository-server")
    (folder / "key").write_text(KEY)
    with start_server(
        repo, log_path=folder / "serve.log", api_key_file=folder / "key", workers=2, poll_s=0.5, keep_versions=2
    ) as handle:
        yield handle


def _index(server) -> dict[tuple[str, str], dict]:
    response = httpx.post(server.url + "/v2/repository/index", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return {(r["name"], r["version"]): r for r in response.json()}


def _predict(server, images, path: str = "/predict/digits", headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        server.url + path,
        content=images["digit.png"],
        headers={**AUTH, "Content-Type": "image/png", **(headers or {})},
        timeout=30,
    )


def _wait_until(condition, timeout: float = 60.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def _all_workers_default(server, images, version: str, n: int = 24) -> bool:
    """Each of n requests (spread over both workers) answered by `version`."""
    return all(_predict(server, images).headers.get("x-model-version") == version for _ in range(n))


class _Load:
    """Concurrent clients posting to /predict/digits until stopped: every status and answering version."""

    def __init__(self, server, images, clients: int = 8) -> None:
        self.url, self.body, self.clients = server.url + "/predict/digits", images["digit.png"], clients
        self.answers: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()))

    async def _run(self) -> None:
        headers = {**AUTH, "Content-Type": "image/png"}
        async with httpx.AsyncClient(timeout=30, headers=headers) as client:

            async def one() -> None:
                while not self._stop.is_set():
                    r = await client.post(self.url, content=self.body)
                    self.answers.append((r.status_code, r.headers.get("x-model-version")))

            await asyncio.gather(*(one() for _ in range(self.clients)))

    def __enter__(self) -> _Load:
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def tmp_png(images) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "digit.png"
    path.write_bytes(images["digit.png"])
    return path


def test_the_repository_serves_every_model_and_version_by_path_header_and_v2(server, images, exported):
    index = _index(server)
    tiny_name, _, tiny_version = exported[1].bentoml_tag.partition(":")
    assert {k for k, r in index.items() if r["state"] == "READY"} == {
        (tiny_name, tiny_version),
        ("digits", "1"),
        ("digits", "2"),
    }
    assert index["digits", "2"]["default"] and not index["digits", "1"]["default"]
    # two models: /predict must say which
    response = _predict(server, images, "/predict")
    assert response.status_code == 400 and "name one" in response.json()["error"]
    answer = _predict(server, images).json()
    assert (answer["model_name"], answer["model_version"]) == ("digits", "2")
    assert _predict(server, images, "/predict/digits/versions/1").json()["model_version"] == "1"
    by_header = _predict(server, images, "/predict", {"X-Model": tiny_name}).json()
    assert by_header["model"] == exported[1].bentoml_tag
    assert _predict(server, images, "/predict/nope").status_code == 404
    v2 = httpx.get(server.url + "/v2/models/digits", headers=AUTH).json()
    assert v2["versions"] == ["1", "2"]
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert triton.is_model_ready("digits", "1") and triton.is_model_ready(tiny_name)
        listed = triton.get_model_repository_index(headers=dict(AUTH))
        assert {(r["name"], r["version"]) for r in listed} >= {("digits", "1"), ("digits", "2")}
        image = httpclient.InferInput("image", [1], "BYTES")
        import numpy as np

        image.set_data_from_numpy(np.array([images["digit.png"]], dtype=np.object_))
        result = triton.infer("digits", [image], model_version="1", headers=dict(AUTH))
        assert result.get_response()["model_version"] == "1"
    finally:
        triton.close()
    from transferkit.serving import predict_files

    answers = predict_files([tmp_png(images)], server.url, api_key=KEY, model="digits", version="1")
    assert answers[0]["model_version"] == "1"
    # KServe's own client (its venv, tests/serving/clients/kserve_v2.py) asks the model by name
    import subprocess

    from tests.serving.test_v2_clients import KSERVE_PYTHON

    script = Path(__file__).with_name("clients") / "kserve_v2.py"
    kserve = subprocess.run(
        [str(KSERVE_PYTHON), str(script), server.url, "digits", KEY, str(tmp_png(images)), "digits.labels"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert kserve.returncode == 0, kserve.stderr[-2000:]
    got = json.loads(kserve.stdout)
    assert got["health"]["model_ready"] and got["binary"]["model_version"] == got["json"]["model_version"] == "2"
    assert len(got["binary"]["outputs"]["digits.labels"][0]) == 5
    metrics = httpx.get(server.url + "/metrics").text
    assert 'transferkit_model_requests_total{model="digits",version="2"}' in metrics
    assert 'transferkit_model_memory_bytes{model="digits",version="2"}' in metrics


def test_a_new_version_folder_is_swapped_in_under_load_without_a_failed_request(server, images, repo):
    with _Load(server, images) as load:
        shutil.copytree(repo / "digits" / "2", repo / "digits" / "3")
        _wait_until(lambda: _index(server).get(("digits", "3"), {}).get("default"), what="version 3 default")
        _wait_until(lambda: _all_workers_default(server, images, "3"), what="every worker answers with 3")
        time.sleep(1.0)
    statuses = Counter(status for status, _ in load.answers)
    assert set(statuses) == {200}, statuses
    versions = [v for _, v in load.answers]
    assert versions[0] == "2" and versions[-1] == "3" and len(versions) > 50
    index = _index(server)  # keep_versions 2: 3 and 2 stay for a rollback, 1 is unloaded
    assert index["digits", "2"]["state"] == "READY" and index["digits", "1"]["state"] == "UNAVAILABLE"


def test_a_version_whose_files_fail_their_sha256_is_refused_and_never_serves(server, images, repo, runs):
    onnx = next(_stored_dir(runs["broken"]).glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-16] + b"\0" * 16)  # same size, other bytes
    shutil.copytree(runs["broken"], repo / "digits" / "4")
    _wait_until(lambda: ("digits", "4") in _index(server), what="version 4 listed")
    row = _index(server)["digits", "4"]
    assert row["state"] == "UNAVAILABLE" and "sha256" in row["reason"], row
    assert _all_workers_default(server, images, "3")
    response = httpx.post(
        server.url + "/v2/repository/models/digits/load", json={"parameters": {"version": "4"}}, headers=AUTH
    )
    assert response.status_code == 400 and "sha256" in response.json()["error"], response.text
    assert _all_workers_default(server, images, "3")


def test_a_rollback_through_tritonclient_under_load_then_forward_again(server, images):
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
    try:
        with _Load(server, images) as load:
            config = json.dumps({"version_policy": {"specific": {"versions": ["2"]}}})
            triton.load_model("digits", config=config, headers=dict(AUTH))  # answers once every worker serves 2
            after_rollback = len(load.answers)
            assert _all_workers_default(server, images, "2")
            time.sleep(0.5)
        assert set(status for status, _ in load.answers) == {200}
        # answers completed after the call returned (a request picks its version when it arrives)
        assert {v for _, v in load.answers[after_rollback + 16 :]} == {"2"}
    finally:
        triton.close()
    forward = httpx.post(
        server.url + "/v2/repository/models/digits/load", json={"parameters": {"version": None}}, headers=AUTH
    )
    assert forward.status_code == 200, forward.text
    assert _all_workers_default(server, images, "3")


def test_a_traffic_split_draws_versions_in_proportion_and_names_each_answer(server, images):
    response = httpx.post(
        server.url + "/v2/repository/models/digits/load",
        json={"parameters": {"split": {"2": 70, "3": 30}}},
        headers=AUTH,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    versions = Counter(_predict(server, images).headers["x-model-version"] for _ in range(400))
    # binomial(400, 0.3): standard deviation 0.023; the tolerance is 0.08 (3.5 deviations)
    assert set(versions) == {"2", "3"} and abs(versions["3"] / 400 - 0.3) < 0.08, versions
    index = _index(server)
    assert index["digits", "3"]["traffic"] == 30.0
    end = httpx.post(server.url + "/v2/repository/models/digits/load", json={"parameters": {"split": {}}}, headers=AUTH)
    assert end.status_code == 200 and _all_workers_default(server, images, "3")


def test_unload_then_load_again_and_the_api_needs_the_key(server, images, exported):
    tiny_name = exported[1].bentoml_tag.partition(":")[0]
    assert httpx.post(server.url + f"/v2/repository/models/{tiny_name}/unload").status_code == 401
    assert httpx.post(server.url + "/v2/repository/index").status_code == 401
    with _Load(server, images) as load:  # the other model's clients see nothing of it
        response = httpx.post(server.url + f"/v2/repository/models/{tiny_name}/unload", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        assert all(_predict(server, images, f"/predict/{tiny_name}").status_code == 404 for _ in range(8))
        assert _index(server)[tiny_name, exported[1].bentoml_tag.partition(":")[2]]["state"] == "UNAVAILABLE"
        response = httpx.post(server.url + f"/v2/repository/models/{tiny_name}/load", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
    assert set(status for status, _ in load.answers) == {200} and len(load.answers) > 20
    assert all(_predict(server, images, f"/predict/{tiny_name}").status_code == 200 for _ in range(8))
    unknown = httpx.post(server.url + "/v2/repository/models/nope/load", headers=AUTH, timeout=120)
    assert unknown.status_code == 400 and "no model 'nope'" in unknown.json()["error"]


def test_a_worker_refuses_a_version_past_its_model_limit_with_the_reason(runs):
    """In-process: the repository of one worker, with room for one version, asked for two."""
    from transferkit.manifest import read_manifest
    from transferkit.serving.batcher import WorkerBudget
    from transferkit.serving.repository import ModelRepository
    from transferkit.serving.settings import ServingSettings
    from transferkit.serving.sources import VersionSource

    tags = [read_manifest(runs[k] / "export").tag for k in ("first", "second")]
    sources = [VersionSource("a", "1", tags[0]), VersionSource("b", "1", tags[1])]
    repository = ModelRepository(ServingSettings(max_models=1, threads=1), WorkerBudget())
    repository.reconcile(sources, {})
    rows = {r["name"]: r for r in repository.index(sources)}
    assert rows["a"]["state"] == "READY" and rows["b"]["state"] == "UNAVAILABLE"
    assert "--max-models 1" in rows["b"]["reason"] and "unload one first" in rows["b"]["reason"]
    assert repository.pick(None).name == "a"  # one model: /predict needs no name
