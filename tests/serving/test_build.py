"""`build_bento`: a Bento with the service code, the stored model and a Dockerfile; it serves from the Bento.
The recipe (bentofile and Dockerfile template) is checked without Docker; tests/serving/test_docker_image.py
builds and runs the image."""

import contextlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import httpx
import pytest
import yaml


@contextlib.contextmanager
def serving_bento(tag: str):
    """`bentoml serve TAG` on a free port until /readyz answers -> its URL; stopped on exit. No
    $TRANSFERKIT_MODEL: the Bento's own argument names what it serves."""
    from transferkit.serving.processes import free_port, stop_tree

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRANSFERKIT_MODEL"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", tag, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the Bento's server exited"
            time.sleep(0.25)
        yield url
    finally:
        stop_tree(proc, 15.0)


@pytest.mark.slow
def test_build_bento_contains_model_code_and_dockerfile(exported, images, tmp_path):
    import bentoml

    from transferkit.serving import build_bento

    run_dir, export = exported
    result = build_bento(run_dir)  # runs `bentoml build` (uv locks requirements against the index)
    assert result.tag.startswith("transferkit-tiny-export:") and result.containerize_command.endswith(result.tag)
    assert result.dockerfile_path == result.bento_path / "env" / "docker" / "Dockerfile"

    # the package source is in the Bento, importable from its working dir (src/); training/export code is not
    src = result.bento_path / "src" / "transferkit"
    assert (src / "serving" / "service.py").is_file() and (src / "preprocess.py").is_file()
    assert not (src / "training").exists() and not (src / "export").exists()

    info = yaml.safe_load((result.bento_path / "bento.yaml").read_text())
    assert info["args"] == {"model": export.bentoml_tag}  # which stored model the service loads
    assert export.bentoml_tag in [m["tag"] for s in info["services"] for m in s["models"]]
    assert info["docker"]["base_image"] == "python:3.11-slim"

    dockerfile = result.dockerfile_path.read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "requirements.lock.txt" in dockerfile and f'transferkit.model="{export.bentoml_tag}"' in dockerfile
    requirements = (result.bento_path / "env" / "python" / "requirements.lock.txt").read_text()  # the image's
    assert "onnxruntime==" in requirements and "bentoml==1.4.40" in requirements
    assert "\ntorch==" not in requirements  # the serving image stays lean

    # `bentoml export` (what containerize does too) bundles the stored model into the artifact
    archive = bentoml.bentos.export_bento(result.tag, str(tmp_path / "bento.tar"))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    name, version = export.bentoml_tag.split(":")
    assert any(n.endswith(f"models/{name}/{version}/model.onnx") for n in names)
    assert any(n.endswith(f"models/{name}/{version}/manifest.json") for n in names)

    # serve the Bento itself, with no $TRANSFERKIT_MODEL: the Bento argument names the model
    with serving_bento(result.tag) as url:
        response = httpx.post(url + "/predict", files={"image": ("d.png", images["digit.png"], "image/png")})
        assert response.status_code == 200 and response.json()["model"] == export.bentoml_tag


@pytest.mark.slow
def test_one_bento_serves_several_runs_each_as_a_model(exported, images, tmp_path_factory):
    """`build RUN RUN`: both stored models bundled, both listed in the service's argument, and the Bento itself
    serves each one by its name."""
    from tests.export.tiny import exported_variant
    from transferkit.manifest import read_manifest
    from transferkit.serving import build_bento

    second = exported_variant(tmp_path_factory, "second", seed=1)
    tags = [exported[1].bentoml_tag, read_manifest(second / "export").tag]
    result = build_bento([exported[0], second])
    assert result.tag.startswith("transferkit-models:")
    info = yaml.safe_load((result.bento_path / "bento.yaml").read_text())
    assert info["args"] == {"model": ",".join(tags)}
    assert set(tags) <= {m["tag"] for s in info["services"] for m in s["models"]}
    with serving_bento(result.tag) as url:
        for tag in tags:
            name = tag.split(":")[0]
            response = httpx.post(
                url + f"/predict/{name}", files={"image": ("d.png", images["digit.png"], "image/png")}
            )
            assert response.status_code == 200 and response.json()["model"] == tag


def render_dockerfile(tmp_path, monkeypatch, base_image="python:3.11-slim") -> str:
    """The Dockerfile `bentoml containerize` would build, rendered by BentoML from the staged build context."""
    from bentoml._internal.bento.build_config import CondaOptions, DockerOptions
    from bentoml._internal.container.generate import generate_containerfile

    from transferkit.serving.build import stage_context

    bentofile_path = stage_context(tmp_path, "transferkit-demo:abc123", "onnxruntime", base_image)
    monkeypatch.chdir(tmp_path)  # BentoML reads a Dockerfile template only from under the working directory
    docker = yaml.safe_load(bentofile_path.read_text())["docker"]
    return generate_containerfile(
        DockerOptions(**docker), str(tmp_path), conda=CondaOptions(), bento_fs=tmp_path, enable_buildkit=False
    )


def test_repo_bentofile_is_the_packaged_recipe():
    from transferkit.serving.build import PACKAGE_DIR, TEMPLATE_IN_CONTEXT, bentofile

    repo_file = PACKAGE_DIR.parent.parent / "bentofile.yaml"
    if not repo_file.is_file():
        pytest.skip("installed package: no repository bentofile.yaml to compare")
    assert yaml.safe_load(repo_file.read_text()) == bentofile()
    assert (PACKAGE_DIR.parent / TEMPLATE_IN_CONTEXT).is_file()  # what the repo file points at
    with pytest.raises(Exception, match="onnxruntime"):
        bentofile(runtime="tensorrt")


def test_staged_context_has_only_serving_code(tmp_path):
    from transferkit.serving.build import stage_context

    stage_context(tmp_path, "transferkit-demo:abc123", "onnxruntime", "python:3.11-slim")
    assert (tmp_path / "transferkit" / "serving" / "service.py").is_file()
    assert not (tmp_path / "transferkit" / "training").exists() and not (tmp_path / "transferkit" / "export").exists()
    template = (tmp_path / "transferkit" / "serving" / "Dockerfile.j2").read_text()
    assert "@" not in template.split("#}", 1)[1]  # every placeholder filled


def test_dockerfile_is_lean_non_root_with_healthcheck_and_exec_entrypoint(tmp_path, monkeypatch):
    dockerfile = render_dockerfile(tmp_path, monkeypatch, base_image="transferkit-base:bookworm")
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.strip().startswith("#")]
    body = "\n".join(lines)
    assert lines[0] == "FROM transferkit-base:bookworm AS base-container"
    for banned in ("apt-get", "apk ", "build-essential", "gcc", "git", "gnupg", "curl ", "uv==", "entrypoint.sh"):
        assert banned not in body, banned  # no compilers, git or gnupg; no uv layer; no shell entrypoint
    assert "--without-pip" in body and "--no-cache-dir" in body

    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")

    healthcheck = next(line for line in lines if line.startswith("HEALTHCHECK"))
    assert "--interval=" in healthcheck
    check = json.loads(body[body.index("CMD [", body.index("HEALTHCHECK")) + 4 :].split("\n", 1)[0])
    assert check[0].endswith("python") and "/readyz" in check[-1]

    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :])
    assert entrypoint == ["/app/.venv/bin/bentoml", "serve", "/home/bentoml/bento", "--timeout-graceful-shutdown", "2"]
    assert lines[-1] == "CMD []" and "STOPSIGNAL SIGTERM" in lines

    labels = dict(re.findall(r'([\w.]+)="([^"]*)"', body[body.index("LABEL") : body.index("HEALTHCHECK")]))
    import transferkit

    assert labels["transferkit.model"] == "transferkit-demo:abc123"
    assert labels["transferkit.version"] == transferkit.__version__ and labels["transferkit.runtime"] == "onnxruntime"
    assert "ENV TRANSFERKIT_RUNTIME=" in body


def test_default_base_image_is_python_slim(tmp_path, monkeypatch):
    assert "FROM python:3.11-slim AS base-container" in render_dockerfile(tmp_path, monkeypatch).splitlines()


def test_build_refuses_an_unbuildable_runtime(tmp_path):
    from transferkit.errors import TransferkitError
    from transferkit.serving.build import build_bento

    with pytest.raises(TransferkitError, match="cannot be built into an image"):
        build_bento(tmp_path, runtime="tensorrt")


def test_containerize_without_an_engine_names_the_fix(monkeypatch):
    from transferkit.errors import TransferkitError
    from transferkit.serving import build

    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(TransferkitError, match="install Docker"):
        build.check_docker()
    monkeypatch.setattr(build.shutil, "which", lambda name: "/usr/bin/docker")
    failed = subprocess.CompletedProcess(["docker", "info"], 1, b"", b"Cannot connect to the Docker daemon")
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(TransferkitError, match="no Docker engine answers") as info:
        build.check_docker()
    assert "\n" not in str(info.value)
