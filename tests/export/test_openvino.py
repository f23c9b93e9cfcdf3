"""OpenVINO IR: fp32 and NNCF int8 exported from the tiny run, verified through the serving runtime, stored with
both files of each IR, selected by `--runtime`, checked by sha256 before loading, and served by the service with
no onnxruntime installed."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.export.tiny import VERIFY_IMAGES, copy_run, with_speed
from transferkit.artifact import PASSED, SLOWER_THAN_FP32, VERIFY_FAILED
from transferkit.errors import ArtifactMismatchError
from transferkit.export import export_run
from transferkit.export.job import ExportOptions
from transferkit.manifest import read_manifest
from transferkit.runtimes.runtime import OnnxRuntime, OpenVinoRuntime
from transferkit.runtimes.selection import auto_order, load_runtime, select_runtime

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CALIBRATION_IMAGES = 32  # per dataset: NNCF collects statistics one image at a time, keep the test short
IR_FILES = ["model.xml", "model.bin", "model-int8.xml", "model-int8.bin"]


@pytest.fixture(scope="module")
def ov_export(exported, tmp_path_factory):
    """(run_dir, ExportResult): the exported tiny run plus openvino and openvino-int8 (stored in BentoML)."""
    run_dir = copy_run(exported[0], tmp_path_factory.mktemp("openvino") / "tiny-openvino")
    result = export_run(
        run_dir,
        formats=("openvino",),
        precision="fp32,int8",
        verify_images=VERIFY_IMAGES,
        options=ExportOptions(calibration_images=CALIBRATION_IMAGES),
    )
    return run_dir, result


def test_fp32_ir_passes_verify_and_matches_pytorch(ov_export):
    fp32 = ov_export[1].formats["openvino"]
    assert fp32.status == PASSED, fp32.error
    for head in ("digits", "fashion-mnist"):
        report = fp32.verification["heads"][head]
        assert report["max_abs_diff"] < 1e-4 and report["top1_agreement"] == 1.0
    assert fp32.verification["runtime"] == "openvino (CPU, latency)"
    details = fp32.details
    assert details["built_from"] == "model.onnx" and details["compress_to_fp16"] is False and details["openvino"]
    assert fp32.measured.images_per_second > 0 and fp32.measured.machine is not None
    # both performance hints were measured, and the faster is what the entry tells the runtime to use
    hints = {t["runtime_options"].get("performance_hint"): t["images_per_second"] for t in fp32.tuning}
    assert set(hints) == {"LATENCY", "THROUGHPUT"} and all(v > 0 for v in hints.values())
    entry = read_manifest(ov_export[0] / "export").artifacts["openvino"]
    assert entry.runtime_options.performance_hint == max(hints, key=hints.get)


def test_int8_ir_is_exported_and_gated(ov_export):
    """Random heads on a tiny model may or may not pass the INT8 gate; what is honest: the IR was written and
    verify judged it with numbers, never an export failure."""
    int8 = ov_export[1].formats["openvino-int8"]
    assert int8.status in (PASSED, VERIFY_FAILED, SLOWER_THAN_FP32), int8.error
    assert int8.file.name == "model-int8.xml" and [f.name for f in int8.files] == ["model-int8.xml", "model-int8.bin"]
    for report in int8.verification["heads"].values():
        assert 0 <= report["top1_agreement"] <= 1 and "accuracy_delta_points" in report
    if int8.status == VERIFY_FAILED:
        assert int8.error and int8.verification["failures"]
    if int8.status == SLOWER_THAN_FP32:  # passed the gate, withheld: slower than openvino fp32 here
        assert "not offered; serve openvino" in int8.error and not int8.verification["failures"]
    q = int8.details["quantization"]
    assert q["calibration_images"] == 2 * CALIBRATION_IMAGES and q["chosen"].startswith("nncf")
    first = int8.details["attempts"][0]
    assert first["name"] == "nncf" and first["settings"]["tool"] == "nncf.quantize (OpenVINO)"
    assert first["settings"]["subset_size"] == 2 * CALIBRATION_IMAGES and first["settings"]["preset"] == "mixed"
    assert int8.details["splits"] == {"calibration": "train", "selection": "val", "gate": "test"}


def test_manifest_lists_both_files_of_each_ir(ov_export):
    export_dir = ov_export[0] / "export"
    manifest = read_manifest(export_dir)
    assert manifest.artifacts["openvino"].files == ("model.xml", "model.bin")
    assert manifest.artifacts["openvino-int8"].files == ("model-int8.xml", "model-int8.bin")
    for name in IR_FILES:  # RUN/export describes every artifact, failed ones too (the stored model does not)
        record = manifest.files[name]
        assert len(record.sha256) == 64 and record.bytes == (export_dir / name).stat().st_size
    assert manifest.artifacts["onnx"].status == PASSED  # what the IR is built from, kept
    # the IR pair is staged in a temporary folder: nothing of it is left beside the artifacts
    references = [e.reference for e in manifest.artifacts.values() if e.servable]  # drift's, one per servable
    assert all(references) and sorted(p.name for p in export_dir.iterdir()) == sorted(
        ["manifest.json", "verify.json", "model.onnx", *IR_FILES, *references]
    )
    verify_doc = json.loads((export_dir / "verify.json").read_text())
    assert {"openvino", "openvino-int8"} <= set(verify_doc["formats"])


def test_runtime_and_artifact_names_select_the_openvino_runner(ov_export):
    export_dir = ov_export[0] / "export"
    manifest = read_manifest(export_dir)
    runner = select_runtime("openvino", manifest, export_dir)
    assert isinstance(runner, OpenVinoRuntime) and runner.artifact in ("openvino", "openvino-int8")
    if manifest.artifacts["openvino-int8"].servable:
        chosen = select_runtime("openvino-int8", manifest, export_dir)
        assert isinstance(chosen, OpenVinoRuntime) and chosen.artifact == "openvino-int8"
    assert isinstance(select_runtime("onnxruntime", manifest, export_dir), OnnxRuntime)

    runtime = load_runtime("openvino", export_dir, manifest, threads=1, check_files=True)
    assert runtime.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    for n in (1, 5, 64):  # dynamic batch, up to the serving ceiling
        out = runtime.run(np.zeros((n, 3, 32, 32), np.float32))
        assert set(out) == {"digits", "fashion-mnist"} and out["digits"].shape == (n, 10)


def test_auto_picks_openvino_where_it_measured_faster(ov_export, monkeypatch):
    monkeypatch.setattr(OnnxRuntime, "gpu_available", staticmethod(lambda: False))
    export_dir = ov_export[0] / "export"
    manifest = read_manifest(export_dir)
    manifest = dataclasses.replace(
        manifest, artifacts={n: e for n, e in manifest.artifacts.items() if n != "openvino-int8"}
    )
    for name, speed in (("onnx", 1000.0), ("openvino", 2000.0)):
        manifest = with_speed(manifest, name, speed)
    assert auto_order(manifest)[0] == "openvino"
    chosen = select_runtime("auto", manifest, export_dir)
    assert (
        chosen.artifact == "openvino"
        and "fastest verified artifact measured on this machine" in chosen.selected_because
    )
    assert "openvino 2,000 img/s" in chosen.selected_because and "onnx 1,000 img/s" in chosen.selected_because
    manifest = with_speed(manifest, "onnx", 3000.0)
    assert select_runtime("auto", manifest, export_dir).artifact == "onnx"


def test_a_modified_weights_file_is_refused_before_loading(ov_export, tmp_path):
    run_dir = copy_run(ov_export[0], tmp_path / "tampered")
    export_dir = run_dir / "export"
    weights = export_dir / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError, match=r"model\.bin: sha256 mismatch"):
        load_runtime("openvino", export_dir, read_manifest(export_dir), check_files=True)


def test_openvino_int8_that_loses_points_is_repaired_with_accuracy_control(probe_run, tmp_path_factory):
    """A linear-probe model loses points under every fully INT8 NNCF attempt; NNCF accuracy control, driven by
    the gate's metric on the validation split, keeps operations in fp32 and brings the model closer to PyTorch."""
    from tests.export.tiny import copy_run

    run_dir = copy_run(probe_run, tmp_path_factory.mktemp("openvino-repair") / "probe")
    result = export_run(
        run_dir,
        formats="openvino",
        precision="int8",
        verify_images=600,  # digits has 270 per split: enough for the gate's bound to pass an equal model
        store=False,
        options=ExportOptions(calibration_images=64, qat="off"),  # QAT: tests/export/test_qat.py
    )
    int8 = result.formats["openvino-int8"]
    attempts = {a["name"]: a for a in int8.details["attempts"]}
    assert list(attempts) == ["nncf", "nncf-bias-correction", "qat", "nncf-accuracy-control", "nncf-more-images"]
    assert attempts["qat"]["status"] == "skipped: --qat off"
    plain, control = attempts["nncf"], attempts["nncf-accuracy-control"]
    if any(a["status"] == "passed on validation" for a in attempts.values() if not a["mixed_precision"]):  # fast
        pytest.skip("on this CPU a fully INT8 NNCF model already passes: nothing to repair")
    assert control["status"].startswith(("passed on validation", "failed on validation")), control
    assert control["fp32_layers"] and control["violation"] < plain["violation"]
    assert control["settings"]["tool"] == "nncf.quantize_with_accuracy_control (OpenVINO)"
    if control["status"].startswith("passed on validation"):
        assert int8.details["quantization"]["chosen"] == "nncf-accuracy-control"
    assert int8.status in (PASSED, VERIFY_FAILED) and int8.verification["heads"]  # then gated on test


def test_unavailable_without_openvino(monkeypatch):
    from transferkit.export import openvino as ov_export_module

    monkeypatch.setitem(sys.modules, "openvino", None)
    ov_export_module._import_problem.cache_clear()
    try:
        reason = ov_export_module.openvino_unavailable_reason("cpu", "fp32")
        assert "openvino" in reason and "pip install 'transferkit[openvino]'" in reason
        assert "transferkit[openvino]" in OpenVinoRuntime.unavailable_reason({})
    finally:
        ov_export_module._import_problem.cache_clear()


def test_the_ir_is_built_from_the_fp32_onnx_file_and_served_on_cpu_only():
    from transferkit.export.formats import FORMATS

    row = FORMATS["openvino"]
    assert row.requires("fp32") == row.requires("int8") == (("onnx", "fp32"),)
    assert row.devices == ("cpu",) and row.companions == (".bin",) and row.auto_rank > FORMATS["onnx"].auto_rank
    # serving imports runtime.py where neither openvino nor onnxruntime is installed; only loading needs one
    code = (
        "import sys\nfor m in ('openvino', 'onnxruntime', 'torch'): sys.modules[m] = None\n"
        "import transferkit.runtimes.runtime as r\nprint(r.OpenVinoRuntime.unavailable_reason({}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "transferkit[openvino]" in done.stdout, done.stderr


def test_build_installs_openvino_only():
    from transferkit.cli import build_parser
    from transferkit.serving.build import RUNTIME_PACKAGES, bentofile

    packages = bentofile("openvino")["python"]["packages"]
    assert any(p.startswith("openvino") for p in packages) and not any(p.startswith("onnxruntime") for p in packages)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    runtime = next(a for a in sub.choices["build"]._actions if a.dest == "runtime")
    assert list(runtime.choices) == list(RUNTIME_PACKAGES) and "openvino" in runtime.choices


SERVE_WITHOUT_ONNXRUNTIME = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["onnxruntime"] = None  # as in an image built with --runtime openvino
    from starlette.testclient import TestClient
    from transferkit.serving.service import TransferkitService

    with warnings.catch_warnings(), TestClient(TransferkitService.to_asgi()) as client:
        warnings.simplefilter("ignore")
        response = client.post("/predict", files={"image": ("d.png", open(sys.argv[1], "rb").read())},
                               data={"top_k": "3"})
    print(response.status_code)
    print(response.text)
    """
)


def test_the_service_answers_with_openvino_without_onnxruntime(ov_export, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    buf = io.BytesIO()
    Image.fromarray((load_digits().images[3] * 255 / 16).astype(np.uint8), mode="L").resize((64, 64)).save(buf, "PNG")
    image = tmp_path / "digit.png"
    image.write_bytes(buf.getvalue())
    env = {
        **os.environ,
        "TRANSFERKIT_MODEL": ov_export[1].bentoml_tag,
        "TRANSFERKIT_RUNTIME": "openvino",
        "TRANSFERKIT_WORKERS": "1",
        "TRANSFERKIT_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_ONNXRUNTIME, str(image)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    status, body = done.stdout.strip().splitlines()[-2:]
    assert status == "200", body
    answer = json.loads(body)
    assert answer["runtime"].startswith("openvino") and answer["model"] == ov_export[1].bentoml_tag
    assert set(answer["heads"]) == {"digits", "fashion-mnist"} and len(answer["heads"]["digits"]) == 3


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_bf16_is_offered_exactly_where_the_cpu_runs_it_natively():
    """OpenVINO's own capability list decides, and it agrees with the CPU's flags (AVX512-BF16 or AMX)."""
    native = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    reason = OpenVinoRuntime.bf16_unavailable_reason()
    assert (reason is None) == native, reason
    if reason:
        assert "no native bfloat16" in reason and "openvino-int8" in reason


def test_bf16_ir_is_gated_on_its_accuracy_drop_and_runs_in_bf16(probe_run, tmp_path):
    from transferkit.artifact import UNAVAILABLE

    run_dir = copy_run(probe_run, tmp_path / "bf16")
    result = export_run(run_dir, formats="openvino", precision="fp32,bf16", verify_images=600, store=False)
    bf16 = result.formats["openvino-bf16"]
    if OpenVinoRuntime.bf16_unavailable_reason():
        assert bf16.status == UNAVAILABLE and "bfloat16" in bf16.error
        return
    assert bf16.status in (PASSED, VERIFY_FAILED), bf16.error
    assert bf16.verification["tolerance"]["confidence"] == 0.95 and bf16.verification["runtime"].endswith("bf16)")
    assert bf16.details["inference_precision"] == "bf16" and bf16.details["compress_to_fp16"] is True
    for head in bf16.verification["heads"].values():
        assert head["top1_agreement"] > 0.95 and head["drop_upper_points"] is not None
    sizes = {n: sum(f.stat().st_size for f in result.formats[n].files) for n in ("openvino", "openvino-bf16")}
    assert sizes["openvino-bf16"] < 0.6 * sizes["openvino"]  # fp16 weights


def test_bf16_refused_cleanly_where_unsupported(probe_run, tmp_path, monkeypatch):
    """On a CPU without native bf16 the format says so and nothing is built or served."""
    from transferkit.artifact import UNAVAILABLE

    reason = "this CPU has no native bfloat16 (test)"
    monkeypatch.setattr(OpenVinoRuntime, "bf16_unavailable_reason", staticmethod(lambda: reason))
    run_dir = copy_run(probe_run, tmp_path / "no-bf16")
    result = export_run(run_dir, formats="openvino", precision="bf16", verify_images=64, store=False)
    bf16 = result.formats["openvino-bf16"]
    assert bf16.status == UNAVAILABLE and bf16.error == reason and not result.ok
    assert not (run_dir / "export" / "model-bf16.xml").exists()
