"""ONNX export of the tiny two-head run: artifacts, ONNX contract, dynamic batch, manifest, verify.json, store."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import torch

from tests.export.tiny import HEADS, VERIFY_IMAGES
from transferkit.export import PASSED, UNAVAILABLE, format_export_table
from transferkit.model import ExportModule
from transferkit.runs import load_run_model
from transferkit.utils import sha256_file


def test_export_passes_verify_and_reports_ok(exported):
    run_dir, result = exported
    assert result.ok, format_export_table(result)
    onnx_result = result.formats["onnx"]
    assert onnx_result.status == PASSED and onnx_result.servable and onnx_result.error is None
    assert onnx_result.details["exporter"] == "dynamo"  # the standard path, no fallback here
    assert result.export_dir == run_dir / "export"
    table = format_export_table(result)
    assert "onnx" in table and "passed" in table and "fashion-mnist" in table and result.bentoml_tag in table


def test_export_dir_holds_exactly_the_artifacts_no_temp_files(exported):
    run_dir, _ = exported
    names = sorted(p.name for p in (run_dir / "export").iterdir())
    # one model file (no .onnx.data), its drift reference, and no .tmp leftovers
    assert names == ["manifest.json", "model.onnx", "reference-onnx.npz", "verify.json"]


def test_onnx_contract_names_opset_and_dynamic_batch(exported):
    run_dir, _ = exported
    model = onnx.load(str(run_dir / "export" / "model.onnx"))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == list(HEADS)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]


def test_onnxruntime_matches_pytorch_at_batch_1_and_7(exported):
    run_dir, _ = exported
    model, _ = load_run_model(run_dir)
    module = ExportModule(model).eval()
    session = ort.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 7):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = session.run(None, {"images": x})
        with torch.inference_mode():
            want = [t.numpy() for t in module(torch.from_numpy(x))]
        for g, w in zip(got, want):
            assert g.shape == (batch, 10)
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def test_manifest_fields_and_hashes(exported):
    run_dir, result = exported
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["manifest_version"] == 2 and manifest["transferkit_version"]
    assert manifest["backbone"] == "mobilenet_v2" and manifest["run_dir"] == str(run_dir.resolve())
    assert manifest["preprocessing"] == json.loads((run_dir / "preprocessing.json").read_text())
    assert manifest["heads"] == HEADS
    assert manifest["inputs"] == [
        {"name": "images", "dtype": "float32", "shape": ["batch", 3, 32, 32], "layout": "NCHW"}
    ]
    assert [o["name"] for o in manifest["outputs"]] == list(HEADS)
    onnx_path = run_dir / "export" / "model.onnx"
    assert manifest["files"]["model.onnx"] == {"sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size}
    assert manifest["source"]["sha256"] == sha256_file(run_dir / "model.pt")
    entry = manifest["formats"]["onnx"]
    assert entry["status"] == PASSED and entry["servable"] is True and entry["runtime"] == "onnxruntime"
    versions = manifest["versions"]
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert versions["onnx"] == onnx.__version__ and versions["onnxruntime"] == ort.__version__
    assert "tensorrt" in versions  # None where it is not installed
    assert manifest["bentoml"]["tag"] == result.bentoml_tag


def test_verify_report_per_head(exported):
    run_dir, _ = exported
    report = json.loads((run_dir / "export" / "verify.json").read_text())
    onnx_report = report["formats"]["onnx"]
    assert onnx_report["passed"] and onnx_report["precision"] == "fp32" and onnx_report["failures"] == []
    assert set(onnx_report["heads"]) == set(HEADS)
    for h in onnx_report["heads"].values():
        assert h["images"] == VERIFY_IMAGES  # test split of one dataset per head, capped at verify_images
        assert h["max_abs_diff"] < 1e-4 <= h["allowed_max_abs_diff"]
        assert h["top1_agreement"] == 1.0 and abs(h["accuracy_delta_points"]) == 0.0
        assert 0.0 <= h["accuracy_pytorch"] <= 1.0
    assert report["tolerances"]["fp32"] == {
        "max_abs_diff": 1e-3,
        "min_top1_agreement": 0.99,
        "max_acc_delta_points": 0.5,
        "confidence": None,
    }


def test_bentoml_store_holds_the_servable_files(exported):
    import bentoml

    run_dir, result = exported
    stored = bentoml.models.get(result.bentoml_tag)
    assert result.bentoml_tag.startswith("transferkit-tiny-export:")
    assert stored.info.labels["project"] == "transferkit"
    assert stored.info.metadata["servable"] == ["onnx"] and stored.info.metadata["image_size"] == 32
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert json.loads(open(stored.path_of("manifest.json")).read()) == manifest  # identical, tag included
    assert sha256_file(stored.path_of("model.onnx")) == manifest["files"]["model.onnx"]["sha256"]
    assert stored.path_of("verify.json")


def test_tensorrt_reports_not_available_without_building_anything(fresh_run):
    from transferkit.export import export_run
    from transferkit.export.tensorrt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None:
        import pytest

        pytest.skip("TensorRT is usable here; the GPU test covers it")
    result = export_run(fresh_run, formats=("tensorrt",), verify_images=8)
    assert list(result.formats) == ["tensorrt"]  # its onnx dependency is not built for nothing
    trt = result.formats["tensorrt"]
    assert trt.status == UNAVAILABLE and "[gpu]" in trt.error and not result.ok and result.bentoml_tag is None
    manifest = json.loads((fresh_run / "export" / "manifest.json").read_text())
    assert manifest["formats"]["tensorrt"]["servable"] is False and manifest["bentoml"] is None
