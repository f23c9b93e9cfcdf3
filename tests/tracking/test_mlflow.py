"""MLflow tracking and registry against a real `mlflow server` on 127.0.0.1 with a SQLite store (its own venv,
made by `make setup`): a tracked training run, eval and export added to it, a registered version served over
HTTP and scored by its registry URI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import run_cli
from transferkit.serving.processes import free_port

mlflow = pytest.importorskip("mlflow")
MLFLOW = Path(__file__).parents[2] / ".venv-mlflow" / "bin" / "mlflow"
TINY = ["--limit", "256", "--epochs", "2", "--image-size", "32", "--batch-size", "32"]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    if not MLFLOW.is_file():
        pytest.skip(f"{MLFLOW} is missing: `make setup` installs the MLflow server there")
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(folder / "art"),
        ],
        stdout=open(folder / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(uri + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tracked_run(tracking_uri, tmp_path_factory, digits_folder):
    out = tmp_path_factory.mktemp("tracked") / "run"
    run_cli(
        "train", "--data", f"imagefolder:{digits_folder}", *TINY, "--out", str(out), "--track", f"mlflow:{tracking_uri}"
    )
    return out


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_tracked_run_has_its_config_every_step_every_epoch_and_its_files(tracking_uri, tracked_run):
    record = json.loads((tracked_run / "tracking.json").read_text())["mlflow"]
    client = _client(tracking_uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params, tags = run.data.params, run.data.tags
    assert params["backbone"] == "mobilenet_v2" and params["image_size"] == "32" and params["epochs"] == "2"
    assert tags["transferkit.run_dir"] == str(tracked_run) and tags["transferkit.weights.name"] == "IMAGENET1K_V1"
    assert len(tags.get("mlflow.source.git.commit", "")) in (0, 40)
    history = json.loads((tracked_run / "metrics.json").read_text())["history"]
    steps = client.get_metric_history(record["run_id"], "step/loss")
    import torch

    trained = torch.load(tracked_run / "checkpoint.pt", weights_only=True)["global_step"]
    assert [m.step for m in steps] == list(range(1, trained + 1))  # every optimiser step, once
    (name,) = history[0]["val_acc"]  # the image folder's name
    epochs = client.get_metric_history(record["run_id"], f"epoch/val_acc/{name}")
    assert [(m.step, m.value) for m in epochs] == [(h["epoch"], h["val_acc"][name]) for h in history]
    files = {a.path for a in client.list_artifacts(record["run_id"], "run")}
    assert {"run/config.yaml", "run/metrics.json", "run/weights.json"} <= files


def test_eval_and_export_join_the_run_and_register_a_version_that_serves_and_scores(
    tracking_uri, tracked_run, digits_folder, tmp_path
):
    record = json.loads((tracked_run / "tracking.json").read_text())["mlflow"]
    track = f"mlflow:{tracking_uri}"
    run_cli("eval", str(tracked_run), "--track", track)
    proc = run_cli(
        "export",
        str(tracked_run),
        "--format",
        "onnx,openvino",
        "--verify-images",
        "64",
        "--track",
        track,
        "--register",
        "digits-tracked",
    )
    assert "registered: models:/digits-tracked/1" in proc.stdout
    client = _client(tracking_uri)
    run = client.get_run(record["run_id"])
    ((name, accuracy),) = json.loads((tracked_run / "eval.json").read_text())["accuracy"].items()
    assert run.data.metrics[f"eval/accuracy/{name}"] == pytest.approx(accuracy)
    assert run.data.tags["transferkit.export.onnx"] == "passed" and "export/onnx/images_per_second" in run.data.metrics
    exported = {a.path for a in client.list_artifacts(record["run_id"], "export")}
    assert {"export/manifest.json", "export/verify.json", "export/export_table.txt"} <= exported
    version = client.get_model_version("digits-tracked", "1")
    assert version.tags["gate.onnx"] == "passed" and version.tags["gate.openvino"] == "passed"
    client.set_registered_model_alias("digits-tracked", "champion", "1")

    env = {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TRANSFERKIT_CACHE": str(tmp_path / "cache"),
        "BENTOML_HOME": str(tmp_path / "bentoml"),
    }  # another machine: nothing of the export is local
    out = tmp_path / "scores.parquet"
    run_cli("score", "models:/digits-tracked@champion", "--input", str(digits_folder), "--out", str(out), env=env)
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows > 100
    served = tmp_path / "cache" / "registry" / "digits-tracked" / "1"
    manifest = json.loads((served / "export" / "manifest.json").read_text())
    assert set(manifest["formats"]) == {"onnx", "openvino"}
    digit = next(iter(sorted(digits_folder.rglob("*.png"))))
    port = free_port()
    server = subprocess.Popen(  # `transferkit serve models:/...` as a user runs it
        [
            sys.executable,
            "-m",
            "transferkit",
            "serve",
            "models:/digits-tracked/1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),
    )
    try:
        response = _when_ready(f"http://127.0.0.1:{port}", server, digit.read_bytes())
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert response.status_code == 200 and response.json()["model_name"] == "transferkit-digits-tracked"


def _when_ready(url: str, server: subprocess.Popen, png: bytes) -> httpx.Response:
    deadline = time.monotonic() + 180  # the version is downloaded, checked and stored before the server starts
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return httpx.post(url + "/predict", content=png, headers={"Content-Type": "image/png"}, timeout=30)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not become ready (exit code {server.poll()})")


def test_a_tracking_server_that_does_not_answer_is_refused_before_training(digits_folder, tmp_path):
    start = time.monotonic()
    proc = run_cli(
        "train",
        "--data",
        f"imagefolder:{digits_folder}",
        *TINY,
        "--out",
        str(tmp_path / "run"),
        "--track",
        f"mlflow:http://127.0.0.1:{free_port()}",
        check=False,
    )
    assert proc.returncode == 2 and "tracking server does not answer" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "run").exists() and time.monotonic() - start < 90
    proc = run_cli("train", "--data", f"imagefolder:{digits_folder}", "--track", "wandb:x", check=False)
    assert proc.returncode == 2 and "use mlflow:URI" in proc.stderr
