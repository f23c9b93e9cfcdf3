"""manifest.json through transferkit.manifest: real exports round-trip, version 1 migrates, the stored copy holds
exactly what is stored, and measurements count only on a machine like the one they were taken on."""

from __future__ import annotations

import dataclasses
import json

import pytest

from transferkit.artifact import PASSED, VERIFY_FAILED
from transferkit.errors import TransferkitError
from transferkit.machine import Machine
from transferkit.manifest import MANIFEST_VERSION, Manifest, Measurement, read_manifest


def test_a_real_export_round_trips(exported):
    run_dir, result = exported
    path = run_dir / "export" / "manifest.json"
    on_disk = json.loads(path.read_text())
    manifest = read_manifest(run_dir / "export")
    assert manifest.to_dict() == on_disk and Manifest.from_dict(manifest.to_dict()) == manifest
    assert on_disk["manifest_version"] == MANIFEST_VERSION == 2
    onnx = manifest.artifacts["onnx"]
    assert onnx.servable and onnx.file == "model.onnx" and onnx.runtime == "onnxruntime" and onnx.batch_range is None
    assert manifest.tag == result.bentoml_tag and manifest.head_names == ["digits", "fashion-mnist"]
    measured = onnx.measured[-1]
    assert measured.batch == 32 and measured.by == "export" and Machine.this().same_kind(measured.machine)


def test_an_openvino_and_int8_export_round_trips(tmp_path):
    """Every field an exporter fills (runtime options, attempts in details, several files) survives the trip."""
    from tests.export.tiny import make_tiny_run
    from transferkit.export import export_run
    from transferkit.export.job import ExportOptions

    pytest.importorskip("openvino")
    run_dir = make_tiny_run(tmp_path / "run")
    export_run(
        run_dir,
        formats="onnx,openvino",
        precision="fp32",
        verify_images=32,
        store=False,
        options=ExportOptions(calibration_images=16),
    )
    manifest = read_manifest(run_dir / "export")
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    ov = manifest.artifacts["openvino"]
    assert ov.files == ("model.xml", "model.bin") and ov.runtime_options.performance_hint in ("LATENCY", "THROUGHPUT")
    assert ov.measured[-1].runtime_options == ov.runtime_options  # the options the figure was measured with


V1 = {
    "manifest_version": 1,
    "transferkit_version": "0.1.0",
    "created": "2026-01-01T00:00:00Z",
    "run_dir": "/runs/x",
    "source": {"file": "model.pt", "sha256": "ab" * 32, "bytes": 10},
    "backbone": "mobilenet_v2",
    # as version 1 wrote it (Preprocessing.to_dict of its day: no jpeg_draft yet)
    "preprocessing": {
        "image_size": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "resize": "bilinear",
        "channels": "RGB",
        "layout": "NCHW",
    },
    "heads": {"digits": [str(i) for i in range(10)]},
    "datasets": {"mnist": "digits"},
    "inputs": [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 32, 32], "layout": "NCHW"}],
    "outputs": [{"name": "digits", "dtype": "float32", "shape": ["batch", 10]}],
    "formats": {
        "onnx": {
            "file": "model.onnx",
            "runtime": "onnxruntime",
            "precision": "fp32",
            "status": PASSED,
            "servable": True,
            "error": None,
            "details": {"opset": 18},
            "measured": {"images_per_second": 6000.0, "batch": 32, "device": "cpu", "runtime": "onnxruntime"},
        },
        "tensorrt-fp16": {
            "format": "tensorrt",
            "file": "model-fp16.engine",
            "files": ["model-fp16.engine"],
            "runtime": "tensorrt",
            "precision": "fp16",
            "status": PASSED,
            "servable": True,
            "details": {
                "built_for_gpu": {"name": "NVIDIA H200"},
                "profile": {"min_batch": 1, "opt_batch": 8, "max_batch": 64},
            },
        },
        "aoti": {
            "format": "aoti",
            "file": "model.pt2",
            "runtime": "torch",
            "precision": "fp32",
            "status": VERIFY_FAILED,
            "servable": False,
            "error": "digits: top-1 agreement 90% < 99%",
            "details": {"device": "cuda", "batch_range": [1, 64]},
        },
    },
    "files": {
        "model.onnx": {"sha256": "cd" * 32, "bytes": 5},
        "model-fp16.engine": {"sha256": "ef" * 32, "bytes": 6},
        "model.pt2": {"sha256": "01" * 32, "bytes": 7},
    },
    "versions": {"python": "3.11"},
    "bentoml": {"tag": "transferkit-x:abc", "model_name": "transferkit-x"},
}


def test_version_1_is_migrated_on_read(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(V1))
    manifest = read_manifest(tmp_path)
    onnx, trt, aoti = (manifest.artifacts[n] for n in ("onnx", "tensorrt-fp16", "aoti"))
    assert onnx.format == "onnx" and onnx.files == ("model.onnx",) and onnx.details == {"opset": 18}
    assert trt.batch_range == (1, 64) and trt.built_for_gpu == "NVIDIA H200" and trt.max_batch == 64
    assert aoti.device == "cuda" and aoti.batch_range == (1, 64) and not aoti.servable and aoti.error
    # a version-1 figure names no machine: it is kept, but `auto` trusts it on no machine
    assert onnx.measured[0].images_per_second == 6000.0 and onnx.measured[0].machine is None
    assert onnx.speed_on(Machine.this(), "cpu") is None
    assert manifest.to_dict()["manifest_version"] == 2 and manifest.tag == "transferkit-x:abc"


def test_an_unknown_version_or_a_broken_file_names_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({**V1, "manifest_version": 7}))
    with pytest.raises(TransferkitError, match="manifest_version 7.*re-run the export"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in V1.items() if k != "heads"}))
    with pytest.raises(TransferkitError, match="malformed.*re-run the export"):
        read_manifest(tmp_path)
    run = tmp_path / "run"  # a run folder (it has config.yaml) that was never exported
    run.mkdir()
    (run / "config.yaml").write_text("data: [digits]\n")
    with pytest.raises(TransferkitError, match="not been exported.*transferkit export"):
        read_manifest(run / "export")
    with pytest.raises(TransferkitError, match="not a transferkit run folder"):
        read_manifest(tmp_path / "nothing")  # tmp_path is no run
    with pytest.raises(TransferkitError, match="no such folder"):
        read_manifest(tmp_path / "gone" / "export")


def test_the_stored_copy_lists_only_servable_artifacts_and_their_files():
    manifest = Manifest.from_dict(V1)
    stored = manifest.stored()
    assert list(stored.artifacts) == ["onnx", "tensorrt-fp16"]
    assert set(stored.files) == {"model.onnx", "model-fp16.engine"}  # model.pt2 (failed) is not stored


def test_a_new_measurement_replaces_only_the_same_machines():
    here = Machine.this()
    other = dataclasses.replace(here, cpu="Another CPU")
    entry = Manifest.from_dict(V1).artifacts["onnx"]
    first = Measurement(100.0, 32, "cpu", "onnxruntime", here, 0.1, "export")
    entry = entry.with_measurement(first).with_measurement(Measurement(200.0, 32, "cpu", "onnxruntime", other))
    assert entry.speed_on(here, "cpu") == first and entry.speed_on(other, "cpu").images_per_second == 200.0
    again = entry.with_measurement(Measurement(150.0, 32, "cpu", "onnxruntime", here, 0.0, "benchmark"))
    assert again.speed_on(here, "cpu").images_per_second == 150.0 and len(again.measured) == 3  # v1's, other's, ours


@pytest.mark.parametrize("name", ["../model.pt", "/etc/passwd", "sub/model.onnx", "..", "a\\b.onnx"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused(exported, tmp_path, name):
    """Manifest file names are joined to the export folder: only bare names are read."""
    on_disk = json.loads((exported[0] / "export" / "manifest.json").read_text())
    on_disk["formats"]["onnx"]["files"] = [name]
    (tmp_path / "manifest.json").write_text(json.dumps(on_disk))
    with pytest.raises(TransferkitError, match="malformed.*not a bare file name"):
        read_manifest(tmp_path)


def test_an_artifact_file_without_a_hash_is_never_loaded_unchecked(exported, tmp_path):
    """A listed file whose sha256 is gone from the manifest fails the check instead of being skipped."""
    from transferkit.errors import ArtifactMismatchError

    manifest = read_manifest(exported[0] / "export")
    entry = manifest.artifacts["onnx"]
    manifest.check_files(exported[0] / "export", names=entry.files)  # as exported: every file checks out
    stripped = dataclasses.replace(manifest, files={f: r for f, r in manifest.files.items() if f != entry.file})
    with pytest.raises(ArtifactMismatchError, match="lists no sha256 for it"):
        stripped.check_files(exported[0] / "export", names=entry.files)
