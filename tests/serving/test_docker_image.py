"""The container image end to end: `transferkit build --image`, `docker run`, predict, `docker stop`.

Needs a Docker engine (`make docker-test` sets one up where /work/shared/tools/docker-setup.sh exists); skipped,
with the reason, where none answers. The default test run leaves it out (`-m "not docker"` in pyproject.toml).
"""

import json
import os
import subprocess
import time

import httpx
import pytest

from tests.serving.conftest import concurrent_posts

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LOCAL_BASE_IMAGE = "transferkit-base:bookworm"  # what docker-setup.sh builds where no registry is reachable
MAX_IMAGE_BYTES = 450 * 1000 * 1000  # `docker image ls` counts in SI megabytes
API_KEY = "test-key-0123456789"
BURST_CLIENTS = 64  # concurrent clients, one connection each, one request each
BURST_LIMIT_S = 60  # the whole burst; on 2 cores it takes a few seconds


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def engine_problem() -> str | None:
    try:
        info = docker("info", check=False, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"no Docker engine: {exc}"
    return None if info.returncode == 0 else f"no Docker engine answers: {info.stderr.strip()[:200]}"


@pytest.fixture(scope="module")
def built_image(exported):
    problem = engine_problem()
    if problem:
        pytest.skip(problem)
    from transferkit.serving.build import DEFAULT_BASE_IMAGE, build_bento

    run_dir, export = exported
    local = docker("image", "inspect", LOCAL_BASE_IMAGE, check=False).returncode == 0
    tag = f"transferkit-test:pytest-{os.getpid()}"
    start = time.monotonic()
    result = build_bento(run_dir, base_image=LOCAL_BASE_IMAGE if local else DEFAULT_BASE_IMAGE, image=tag)
    print(f"image {tag} built in {time.monotonic() - start:.1f}s")
    assert result.image == tag
    yield tag, export.bentoml_tag
    docker("image", "rm", "-f", tag, check=False)


def wait_ready(url: str, container: str, limit: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        state = docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        assert state == "true", docker("logs", container, check=False).stderr[-2000:]
        time.sleep(0.2)
    raise AssertionError(f"not ready within {limit}s: " + docker("logs", container, check=False).stderr[-2000:])


def expected_top_labels(export_dir, data: bytes) -> dict[str, str]:
    """Top-1 label per head for an encoded image, computed here on the host from the exported ONNX file and its
    manifest's preprocessing: no HTTP, no container, no batching."""
    from transferkit.manifest import read_manifest
    from transferkit.preprocess import SERVED_FORMATS, decode_image
    from transferkit.runtimes.selection import load_runtime

    manifest = read_manifest(export_dir)
    pre = manifest.preprocessing
    pixels = pre.pil_to_uint8(decode_image(data, formats=SERVED_FORMATS))[None]
    logits = load_runtime("onnxruntime", export_dir, manifest).run(pre.normalize_numpy(pixels))
    return {head: labels[int(logits[head][0].argmax())] for head, labels in manifest.heads.items()}


def top_labels(answer: dict) -> dict[str, str]:
    return {head: preds[0]["label"] for head, preds in answer["heads"].items()}


def test_image_is_lean_and_labelled(built_image):
    tag, model_tag = built_image
    info = json.loads(docker("image", "inspect", tag).stdout)[0]
    assert info["Size"] <= MAX_IMAGE_BYTES, f"{info['Size'] / 1e6:.0f} MB"
    config = info["Config"]
    assert config["User"] not in ("", "root", "0")
    assert config["Entrypoint"][:2] == ["/app/.venv/bin/bentoml", "serve"]  # exec form: no shell
    assert "/readyz" in " ".join(config["Healthcheck"]["Test"])
    labels = config["Labels"]
    assert labels["transferkit.model"] == model_tag and labels["transferkit.runtime"] == "onnxruntime"
    # no compilers, git or gnupg; the server runs as a user without a root uid
    found = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        tag,
        "-c",
        "id -u; for c in gcc cc g++ make git gpg gpg2 curl; do command -v $c; done; true",
    )
    uid, *tools = found.stdout.split()
    assert uid != "0" and tools == [], tools


def test_container_serves_and_stops_cleanly(built_image, images, exported):
    from transferkit.serving.processes import free_port

    tag, model_tag = built_image
    expected = expected_top_labels(exported[0] / "export", images["digit.png"])
    port = free_port()
    container = docker(
        "run", "-d", "-p", f"127.0.0.1:{port}:3000", "-e", f"TRANSFERKIT_API_KEY={API_KEY}", tag
    ).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        print(f"ready {wait_ready(url, container):.1f}s after docker run")
        auth = {"Authorization": f"Bearer {API_KEY}"}
        png = images["digit.png"]
        response = httpx.post(url + "/predict", headers=auth, files={"image": ("d.png", png, "image/png")}, timeout=30)
        assert response.status_code == 200, response.text
        single = response.json()
        assert single["model"] == model_tag and top_labels(single) == expected
        # the key came in through `docker run -e`
        assert httpx.post(url + "/predict", files={"image": ("d.png", png, "image/png")}).status_code == 401
        corrupt = httpx.post(url + "/predict", headers=auth, files={"image": ("d.png", png[:60], "image/png")})
        assert corrupt.status_code == 400 and "error" in corrupt.json()
        assert httpx.get(url + "/readyz").status_code == 200  # still serving after the bad upload

        # Many clients at once through docker's port mapping: every one answered (a dropped connection raises
        # here), none refused, and batching changes no answer.
        start = time.monotonic()
        burst = concurrent_posts(url, BURST_CLIENTS, png, headers=auth)
        took = time.monotonic() - start
        statuses = [r.status_code for r, _ in burst]
        print(f"{BURST_CLIENTS} concurrent requests answered in {took:.1f}s, slowest {max(s for _, s in burst):.2f}s")
        assert statuses == [200] * BURST_CLIENTS, sorted(set(statuses))
        assert took < BURST_LIMIT_S
        for r, _ in burst:
            answer = r.json()
            assert answer["model"] == model_tag and top_labels(answer) == expected
            for head, preds in answer["heads"].items():
                alone = {p["label"]: p["score"] for p in single["heads"][head]}
                assert all(abs(p["score"] - alone[p["label"]]) <= 1e-4 for p in preds if p["label"] in alone)

        health = ""
        for _ in range(60):  # the HEALTHCHECK's first probe runs one interval (10 s) after the start
            health = docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
            if health != "starting":
                break
            time.sleep(0.5)
        assert health == "healthy"

        start = time.monotonic()
        docker("stop", container, timeout=60)
        stopped = time.monotonic() - start
        exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip()
        print(f"docker stop took {stopped:.1f}s, exit code {exit_code}")
        assert stopped < 10 and exit_code == "0", docker("logs", container, check=False).stderr[-2000:]
    finally:
        docker("rm", "-f", container, check=False)
