"""`build_bento`: a Bento with the service code, the stored model and a Dockerfile; it serves from the Bento."""
import os
import subprocess
import sys
import tarfile
import time

import httpx
import pytest
import yaml


@pytest.mark.slow
def test_build_bento_contains_model_code_and_dockerfile(exported, images, tmp_path):
    import bentoml

    from transferkit.serving import build_bento
    from transferkit.serving.server import _stop, free_port

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
    assert info["image"]["base_image"] == "python:3.11-slim"

    dockerfile = result.dockerfile_path.read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "pip install -r $BENTO_PATH/env/python/requirements.txt" in dockerfile  # the package's requirements
    requirements = (result.bento_path / "env" / "python" / "requirements.txt").read_text()
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
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRANSFERKIT_MODEL"}
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", result.tag, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
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
        response = httpx.post(url + "/predict", files={"image": ("d.png", images["digit.png"], "image/png")})
        assert response.status_code == 200 and response.json()["model"] == export.bentoml_tag
    finally:
        _stop(proc, group=True)
