"""A timm backbone through every command: train (its weights from the packaged MobileNetV2 file), eval, distill,
export to ONNX and OpenVINO through the gate, score a folder and serve real HTTP requests."""

import json

import httpx
import pytest

from tests.backbones.test_weights import MOBILENET_FILE
from tests.helpers import run_cli

pytest.importorskip("timm")
TINY = ["--limit", "256", "--epochs", "1", "--image-size", "32", "--batch-size", "32"]


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, digits_folder):
    out = tmp_path_factory.mktemp("timm-run") / "run"
    data = f"imagefolder:{digits_folder}"
    proc = run_cli(
        "train",
        "--data",
        data,
        "--backbone",
        "timm/mobilenetv2_100",
        "--weights",
        str(MOBILENET_FILE),
        *TINY,
        "--out",
        str(out),
    )
    assert "314 tensors matched by position" in proc.stderr
    return out


def test_the_run_records_its_backbone_weights_and_timm_input_definition(timm_run):
    weights = json.loads((timm_run / "weights.json").read_text())
    assert weights["backbone"] == "timm/mobilenetv2_100" and weights["matched"] == "by position"
    assert weights["sha256"] == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    pre = json.loads((timm_run / "preprocessing.json").read_text())
    assert pre["resize"] == "bicubic" and pre["image_size"] == 32  # mobilenetv2_100's pretrained_cfg interpolation


def test_eval_and_distill_into_a_timm_student(timm_run, digits_folder, tmp_path):
    run_cli("eval", str(timm_run))
    report = json.loads((timm_run / "eval.json").read_text())
    assert "digits" in json.dumps(report)
    student = tmp_path / "student"
    run_cli(
        "distill",
        "--teachers",
        str(timm_run),
        "--data",
        f"imagefolder:{digits_folder}",
        "--backbone",
        "timm/mobilenetv2_100",
        "--weights",
        "none",
        *TINY,
        "--out",
        str(student),
    )
    assert json.loads((student / "weights.json").read_text())["source"] == "none"


def test_export_through_the_gate_then_score_and_serve(timm_run, digits_folder, tmp_path):
    from transferkit.serving import start_server

    proc = run_cli("export", str(timm_run), "--format", "onnx,openvino", "--verify-images", "64")
    manifest = json.loads((timm_run / "export" / "manifest.json").read_text())
    assert manifest["backbone"] == "timm/mobilenetv2_100"
    verdicts = {name: entry["status"] for name, entry in manifest["formats"].items()}
    assert verdicts == {"onnx": "passed", "openvino": "passed"}, proc.stderr[-2000:]
    scored = tmp_path / "scores.parquet"
    run_cli("score", str(timm_run), "--input", str(digits_folder), "--out", str(scored))
    import pyarrow.parquet as pq

    table = pq.read_table(scored)
    assert table.num_rows > 100 and table.column("error").null_count == table.num_rows
    digit = next(p for p in sorted(digits_folder.rglob("*.png")))
    with start_server(timm_run, workers=1, log_path=tmp_path / "serve.log") as server:
        response = httpx.post(
            server.url + "/predict", content=digit.read_bytes(), headers={"Content-Type": "image/png"}, timeout=30
        )
    assert response.status_code == 200, response.text
    answer = json.dumps(response.json())
    assert json.loads(answer)["model_name"] and '"label"' in answer and '"score"' in answer, answer
