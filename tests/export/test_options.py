"""Bad options are refused before any work; AOTInductor export on this machine (slow)."""

import json

import pytest

from tests.export.tiny import copy_run
from transferkit.errors import ConfigError
from transferkit.export import FORMATS, PASSED, export_run


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"formats": ("onnx", "tflite")}, ["tflite", "onnx", "tensorrt", "aoti"]),
        ({"formats": ("aoti",), "precision": "int8"}, ["int8", "aoti", "fp32"]),
        ({"formats": ("onnx",), "precision": "bf16"}, ["bf16", "onnx", "fp32", "int8", "fp16"]),
        ({"formats": ("onnx", "aoti"), "precision": "int8"}, ["aoti", "fp32", "none of int8"]),
        ({"formats": ("onnx",), "precision": "fp32,fp32"}, ["twice"]),
        ({"formats": ()}, ["no export format"]),
        ({"formats": ("onnx", "onnx")}, ["twice"]),
        ({"device": "tpu"}, ["cpu", "cuda"]),
        ({"verify_images": 0}, ["--verify-images"]),
    ],
)
def test_bad_options_are_config_errors_before_any_work(fresh_run, kwargs, words):
    with pytest.raises(ConfigError) as info:
        export_run(fresh_run, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert not (fresh_run / "export").exists()


def test_formats_table_rows_are_complete():
    for name, row in FORMATS.items():
        assert row.name == name and row.filename.startswith("model.") and row.precisions[0] == "fp32"
        assert row.runtime in ("onnxruntime", "tensorrt", "torch", "openvino") and set(row.devices) <= {"cpu", "gpu"}
    assert FORMATS["tensorrt"].devices == ("gpu",)
    # TensorRT builds from the fp32 ONNX file at every precision (INT8 through a symmetric QDQ model of its own)
    assert FORMATS["tensorrt"].requires("fp16") == FORMATS["tensorrt"].requires("int8") == (("onnx", "fp32"),)
    assert FORMATS["onnx"].requires("int8") == (("onnx", "fp32"),) and FORMATS["onnx"].requires("fp32") == ()


@pytest.mark.slow
def test_aoti_export_on_cpu_passes_and_keeps_the_onnx_entry(exported, tmp_path):
    """AOTInductor compiles C++ for this CPU (about a minute on 2 cores)."""
    from transferkit.export.aoti import aoti_unavailable_reason
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.selection import load_runtime

    if aoti_unavailable_reason("cpu"):
        pytest.skip(aoti_unavailable_reason("cpu"))
    run_dir = copy_run(exported[0], tmp_path / "aoti-run")
    result = export_run(run_dir, formats=("aoti",), verify_images=32, store=False)
    aoti = result.formats["aoti"]
    assert aoti.status == PASSED, aoti.error
    assert aoti.verification["heads"]["digits"]["max_abs_diff"] < 1e-4
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["formats"]["aoti"]["device"] == "cpu" and manifest["formats"]["aoti"]["batch_range"] == [1, 64]
    assert manifest["formats"]["onnx"]["status"] == PASSED  # unchanged onnx from the same model.pt: kept
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.pt2",
        "reference-aoti.npz",  # each servable artifact's drift reference, the kept onnx's too
        "reference-onnx.npz",
        "verify.json",
    ]
    runtime = load_runtime("torch", run_dir / "export", read_manifest(run_dir / "export"))
    import numpy as np

    out = runtime.run(np.zeros((3, 3, 32, 32), np.float32))
    assert out["digits"].shape == (3, 10) and out["fashion-mnist"].shape == (3, 10)
