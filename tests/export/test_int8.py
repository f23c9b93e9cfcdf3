"""Reduced precision: INT8 ONNX through the gate (and its repair), fp16 ONNX with fp32 I/O, served by artifact name."""
import json

import numpy as np
import pytest

from tests.export.tiny import copy_run
from transferkit.artifact import PASSED, VERIFY_FAILED
from transferkit.errors import ConfigError, TransferkitError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """A trained run (linear-probe heads on digits and Fashion-MNIST) that static INT8 hurts: its heads read
    frozen ImageNet features whose small differences quantization blurs, so the repair has work to do."""
    from tests.export.tiny import make_probe_run

    return make_probe_run(tmp_path_factory.mktemp("int8") / "probe")


def _export_int8(probe_run, tmp_path_factory, **options):
    from transferkit.export import export_run
    from transferkit.export.formats import ExportOptions

    run_dir = copy_run(probe_run, tmp_path_factory.mktemp("int8") / "run")
    result = export_run(run_dir, formats="onnx", precision="fp32,int8", verify_images=128,
                        options=ExportOptions(calibration_images=64, **options))  # fmt: skip
    return run_dir, result


@pytest.fixture(scope="module")
def int8_strict(probe_run, tmp_path_factory):
    """The probe run at fp32 and int8 with the default gate and repair budget (8 layers)."""
    return _export_int8(probe_run, tmp_path_factory)


@pytest.fixture(scope="module")
def int8_export(probe_run, tmp_path_factory):
    """The same int8 export with a gate the user widened (--max-acc-delta 25 --min-agreement 0.5) and no repair:
    a servable int8 artifact for the serving tests."""
    return _export_int8(probe_run, tmp_path_factory, max_acc_delta_points=25.0, min_top1_agreement=0.5,
                        int8_fallback="off")  # fmt: skip


def test_int8_that_the_repair_cannot_save_is_reported_with_every_step_and_not_served(int8_strict):
    from transferkit.serving.manifest import read_manifest
    from transferkit.serving.runtime import select_runtime

    run_dir, result = int8_strict
    int8 = result.formats["onnx-int8"]
    assert int8.status == VERIFY_FAILED and "top-1 agreement" in int8.error and not result.ok
    report = int8.verification
    assert report["tolerance"] == {"max_abs_diff": None, "min_top1_agreement": 0.97, "max_acc_delta_points": 1.0}
    for head in report["heads"].values():  # the numbers are there, per head and per dataset
        assert 0 <= head["top1_agreement"] < 1 and head["per_dataset"]
    manifest = read_manifest(run_dir / "export")
    entry = manifest["formats"]["onnx-int8"]
    assert entry["format"] == "onnx" and entry["file"] == "model-int8.onnx" and not entry["servable"]
    quant = entry["details"]["quantization"]
    assert quant["format"] == "QDQ" and quant["per_channel"] and quant["calibration_images"] == 2 * 64
    repair = entry["details"]["repair"]
    assert [len(s["fp32_layers"]) for s in repair["steps"]] == [0, 1, 2, 4, 8] and not repair["passed"]
    assert not any(s["passed"] for s in repair["steps"]) and all(s["failures"] for s in repair["steps"])
    # each step adds the next most sensitive layers, named by the PyTorch module they came from
    assert repair["steps"][2]["fp32_layers"][:1] == repair["steps"][1]["fp32_layers"]
    assert len(repair["fp32_layers"]) == 8 and all(" (backbone." in layer or " (heads." in layer
                                                   for layer in repair["fp32_layers"][:1])  # fmt: skip
    sensitivity = entry["details"]["sensitivity"]
    assert [s["error_removed"] for s in sensitivity] == sorted((s["error_removed"] for s in sensitivity), reverse=True)
    verify_doc = json.loads((run_dir / "export" / "verify.json").read_text())
    assert verify_doc["formats"]["onnx-int8"]["repair"] == repair
    with pytest.raises(TransferkitError, match="not servable"):
        select_runtime("onnx-int8", manifest, run_dir / "export")
    assert select_runtime("auto", manifest, run_dir / "export").artifact == "onnx"


def test_int8_within_the_gate_is_smaller_and_measured(int8_export):
    run_dir, result = int8_export
    int8 = result.formats["onnx-int8"]
    assert int8.status == PASSED, int8.error
    assert int8.verification["tolerance"]["max_acc_delta_points"] == 25.0  # the export's override is recorded
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    entry = manifest["formats"]["onnx-int8"]
    assert entry["details"]["repair"]["steps"][0]["fp32_layers"] == [] and len(entry["details"]["repair"]["steps"]) == 1
    # int8 weights: the QDQ file is under a third of fp32's size
    assert (run_dir / "export" / "model-int8.onnx").stat().st_size < 0.35 * (run_dir / "export" / "model.onnx").stat().st_size
    assert entry["measured"]["images_per_second"] > 0 and manifest["formats"]["onnx"]["measured"]["batch"] == 32


def test_int8_is_served_by_artifact_name(int8_export):
    from transferkit.serving.manifest import read_manifest, verify_files
    from transferkit.serving.runtime import OnnxRuntime, load_runtime, select_runtime

    run_dir, _ = int8_export
    export_dir = run_dir / "export"
    manifest = read_manifest(export_dir)
    runtime = load_runtime("onnx-int8", export_dir, manifest, verify=verify_files)
    assert isinstance(runtime, OnnxRuntime) and runtime.artifact == "onnx-int8" and "onnx-int8" in runtime.description
    out = runtime.run(np.zeros((3, 3, 32, 32), np.float32))
    assert {k: v.shape for k, v in out.items()} == {h: (3, 10) for h in manifest["heads"]}
    # `onnxruntime` (the runtime) and `auto` take the fastest of its verified artifacts by the measured numbers
    faster = max(("onnx", "onnx-int8"), key=lambda a: manifest["formats"][a]["measured"]["images_per_second"])
    assert select_runtime("onnxruntime", manifest, export_dir).artifact == faster
    assert select_runtime("auto", manifest, export_dir).artifact == faster
    with pytest.raises(ConfigError, match="unknown runtime 'onnx-fp16'; use one of auto, .*onnx, onnx-int8"):
        select_runtime("onnx-fp16", manifest, export_dir)  # the export's own artifacts are listed


def test_a_broken_calibration_is_rejected_and_the_repair_is_reported(probe_run, tmp_path):
    """Calibrating on one constant image collapses every activation range: the gate must reject it, and the
    repair must say which layers it kept in fp32 and what the gate measured at each step."""
    from transferkit.export import verify
    from transferkit.export.formats import ExportJob, ExportOptions
    from transferkit.export.onnx import export_onnx
    from transferkit.export.pipeline import _onnx_gate
    from transferkit.export.quantize import quantize_int8
    from transferkit.model import ExportModule
    from transferkit.runs import load_run_model

    model, run = load_run_model(probe_run)
    module, heads = ExportModule(model).eval(), list(model.head_names)
    inputs = verify.load_verify_inputs(run, 64)
    reference = verify.pytorch_logits(module, inputs.batch, heads)
    options = ExportOptions(max_fp32_layers=2)
    constant = np.zeros((8, 3, 32, 32), np.float32)
    job = ExportJob(module, tmp_path, "int8", "cpu", heads, 32, options=options, calibration=lambda n: constant,
                    gate=_onnx_gate(reference, inputs, heads, options))  # fmt: skip
    fp32 = tmp_path / "model.onnx"
    export_onnx(module, job.example_input(), fp32, heads)
    details = quantize_int8(fp32, tmp_path / "model-int8.onnx", job)
    repair = details["repair"]
    first = repair["steps"][0]
    assert first["fp32_layers"] == [] and not first["passed"] and first["failures"]
    assert [len(s["fp32_layers"]) for s in repair["steps"][1:]] == [1, 2][: len(repair["steps"]) - 1]
    assert len(repair["fp32_layers"]) in (1, 2) and details["sensitivity"]
    assert details["sensitivity"][0]["error_removed"] >= details["sensitivity"][-1]["error_removed"]
    assert all(set(s["accuracy"]) == {"digits", "fashion-mnist"} for s in repair["steps"])
    assert (tmp_path / "model-int8.onnx").is_file()
    # the file left behind is the last step's: the gate's verdict on it is the repair's verdict
    final = job.gate(tmp_path / "model-int8.onnx", "int8")
    assert final["passed"] == repair["passed"] == repair["steps"][-1]["passed"]


def test_keeping_a_layer_in_fp32_rewires_it_to_the_fp32_tensors(int8_export):
    import onnx

    from transferkit.export.quantize import keep_in_fp32, repairable_layers

    run_dir, _ = int8_export
    qdq = onnx.load(str(run_dir / "export" / "model-int8.onnx"))
    fp32 = onnx.load(str(run_dir / "export" / "model.onnx"))
    layers = repairable_layers(qdq)
    assert len(layers) > 20  # MobileNetV2: every conv, add and head
    first_conv = next(n for n in layers if n.startswith("node_Conv"))
    repaired = keep_in_fp32(qdq, fp32, [first_conv])
    onnx.checker.check_model(repaired)
    node = next(n for n in repaired.graph.node if n.name == first_conv)
    original = next(n for n in fp32.graph.node if n.name == first_conv)
    assert list(node.input)[:2] == list(original.input)[:2]  # image and fp32 weight, no DequantizeLinear
    producers = {o: n.op_type for n in repaired.graph.node for o in n.output}
    assert "DequantizeLinear" not in {producers.get(i) for i in node.input[:2]}  # the bias may stay int32 + DQ
    assert len(repaired.graph.node) < len(qdq.graph.node)  # the Q/DQ pairs nobody reads any more are gone


def test_fp16_onnx_keeps_fp32_inputs_and_outputs_and_is_gpu_only(exported, tmp_path):
    import onnx

    from transferkit.export import export_run
    from transferkit.serving.manifest import read_manifest
    from transferkit.serving.runtime import artifact_problem, load_runtime, select_runtime

    run_dir = copy_run(exported[0], tmp_path / "run")
    result = export_run(run_dir, formats="onnx", precision="fp16", verify_images=64, store=False)
    fp16 = result.formats["onnx-fp16"]
    assert fp16.status in (PASSED, VERIFY_FAILED) and fp16.verification["heads"], fp16.error
    model = onnx.load(str(run_dir / "export" / "model-fp16.onnx"))
    floats = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [floats]
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {floats}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    manifest = read_manifest(run_dir / "export")
    assert manifest["formats"]["onnx"]["status"] == PASSED  # the earlier fp32 artifact is kept beside it
    if fp16.status == PASSED:
        # on this CPU it is verified but never served: auto takes fp32, and asking for it says why
        assert "GPU only" in artifact_problem("onnx-fp16", manifest, run_dir / "export")
        assert select_runtime("auto", manifest, run_dir / "export").artifact == "onnx"
        with pytest.raises(TransferkitError, match="GPU only"):
            load_runtime("onnx-fp16", run_dir / "export", manifest)


def test_the_tensorrt_qdq_model_is_symmetric_and_runs(exported, tmp_path):
    """What a TensorRT INT8 engine is built from (TensorRT itself is not installed here): int8 activations with
    zero points of 0, per-channel int8 weights, and still a working ONNX model with the same contract."""
    import onnx
    from onnx import numpy_helper

    from transferkit.export.formats import ExportJob, ExportOptions
    from transferkit.export.quantize import quantize_for_tensorrt
    from transferkit.export.verify import onnx_file_logits

    run_dir = exported[0]
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    job = ExportJob(None, tmp_path, "int8", "cuda", ["digits", "fashion-mnist"], 32,
                    options=ExportOptions(calibration_images=16), calibration=lambda n: calibration[:n])  # fmt: skip
    details = quantize_for_tensorrt(run_dir / "export" / "model.onnx", tmp_path / "qdq.onnx", job)
    assert details["activations"] == "int8 symmetric" and details["calibration_images"] == 16
    model = onnx.load(str(tmp_path / "qdq.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes
    for node in quantize_nodes:  # activations: int8, zero point 0
        zero_point = numpy_helper.to_array(inits[node.input[2]])
        assert zero_point.dtype == np.int8 and not zero_point.any()
    out = onnx_file_logits(tmp_path / "qdq.onnx", calibration[:4], ["digits", "fashion-mnist"])
    assert out["digits"].shape == (4, 10) and np.isfinite(out["fashion-mnist"]).all()
