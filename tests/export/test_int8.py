"""Reduced precision: INT8 ONNX chosen among its attempts on validation and gated on test, a failed INT8 that
blocks nothing, fp16 ONNX with fp32 I/O, served by artifact name."""

import json

import numpy as np
import pytest

from tests.export.tiny import copy_run
from transferkit.artifact import PASSED, SLOWER_THAN_FP32, VERIFY_FAILED
from transferkit.errors import ConfigError, TransferkitError

pytestmark = pytest.mark.slow


# `probe_run` (tests/conftest.py, shared by the session): a trained run that static INT8 hurts: its linear-probe
# heads read frozen ImageNet features whose small differences quantization blurs, so the repair has work to do.


def _export_int8(probe_run, tmp_path_factory, **options):
    from transferkit.export import export_run
    from transferkit.export.job import ExportOptions

    run_dir = copy_run(probe_run, tmp_path_factory.mktemp("int8") / "run")
    result = export_run(
        run_dir,
        formats="onnx",
        precision="fp32,int8",
        verify_images=600,  # digits has 270 per split: enough for the gate's bound to pass an equal model
        options=ExportOptions(calibration_images=64, **options),
    )
    return run_dir, result


@pytest.fixture(scope="module")
def int8_strict(probe_run, tmp_path_factory):
    """The probe run at fp32 and int8 with the default gate, fallback and repair budget (8 layers); without
    quantization-aware training, which tests/export/test_qat.py covers, so mixed precision has work to do."""
    return _export_int8(probe_run, tmp_path_factory, qat="off")


@pytest.fixture(scope="module")
def int8_failed(probe_run, tmp_path_factory):
    """The same with --int8-fallback off: every fully INT8 attempt loses points on this model, so onnx-int8 is
    reported and not served while onnx passes (the partial-failure export)."""
    return _export_int8(probe_run, tmp_path_factory, int8_fallback="off", qat="off")


@pytest.fixture(scope="module")
def int8_export(probe_run, tmp_path_factory):
    """The same int8 export with a gate the user widened (--max-acc-delta 25 --min-agreement 0.5) and no repair:
    a servable int8 artifact for the serving tests, offered even where it measures slower than fp32."""
    return _export_int8(
        probe_run,
        tmp_path_factory,
        max_acc_delta_points=25.0,
        min_top1_agreement=0.5,
        int8_fallback="off",
        qat="off",
        slower_int8="offer",
    )


FULL_INT8 = ["ort-minmax", "ort-entropy", "ort-percentile"]
MIXED = ["ort-layer-repair", "nncf-accuracy-control"]
QAT = ["qat-ort-minmax", "qat"]  # the fine-tuned weights through onnxruntime's quantizer, then NNCF's QDQ
ALL = [*FULL_INT8, *QAT, *MIXED]


def test_a_hard_int8_case_tries_every_attempt_and_reports_each(int8_strict):
    """The linear-probe model loses points under every fully INT8 attempt: the search goes on to mixed precision
    (the per-layer repair, then NNCF accuracy control unless the repair already passed faster than fp32),
    records every attempt with its validation numbers, and the result is either repaired or reported with
    every attempt and not served."""
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.selection import select_runtime

    run_dir, result = int8_strict
    int8 = result.formats["onnx-int8"]
    attempts = {a["name"]: a for a in int8.details["attempts"]}
    assert list(attempts) == ALL and all(attempts[n]["status"] == "skipped: --qat off" for n in QAT)
    for name in FULL_INT8:  # calibrated, scored on validation, and none good enough
        assert attempts[name]["status"] == "failed on validation", attempts[name]
        assert set(attempts[name]["validation"]["accuracy_delta_points"]) == {"digits", "fashion-mnist"}
        bounds = attempts[name]["validation"]["drop_upper_points"]
        assert max(bounds.values()) > 1.0  # failed by the gate's statistic: the drop's 95% bound above 1 point
        assert attempts[name]["violation"] > 1 and attempts[name]["seconds"] > 0
    assert attempts["ort-minmax"]["settings"]["method"] == "minmax"
    repaired_fast = attempts["ort-layer-repair"]["status"] == "passed on validation"
    for name in MIXED:  # mixed precision ran because no fully INT8 attempt passed
        if name == "nncf-accuracy-control" and repaired_fast:
            assert attempts[name]["status"].startswith("skipped: an attempt faster than fp32"), attempts[name]
            continue
        assert attempts[name]["status"].startswith(("passed on validation", "failed on validation")), attempts[name]
    repair = attempts["ort-layer-repair"]
    assert 1 <= len(repair["fp32_layers"]) <= 8 and repair["steps"][0] == {
        "fp32_layers": 1,
        "passed_on_validation": False,
    }
    assert all(" (backbone." in layer or " (heads." in layer for layer in repair["fp32_layers"][:1])
    assert [s["error_removed"] for s in repair["sensitivity"]] == sorted(
        (s["error_removed"] for s in repair["sensitivity"]), reverse=True
    )
    if not repaired_fast:
        assert len(attempts["nncf-accuracy-control"]["fp32_layers"]) >= 1  # what NNCF reverted, by its own report
    quantization = int8.details["quantization"]
    passed = [n for n, a in attempts.items() if a["status"].startswith("passed on validation")]
    if passed:  # the fastest that passed is the one written, one faster than fp32 before any slower
        fastest = max(
            passed, key=lambda n: (attempts[n]["status"] == "passed on validation", attempts[n]["images_per_second"])
        )
        assert quantization["chosen"] == fastest and quantization["passed_on_validation"]
    else:  # the closest is written, so the gate reports real numbers on it
        closest = min(attempts.values(), key=lambda a: a.get("violation", 1e9))
        assert quantization["chosen"] == closest["name"] and not quantization["passed_on_validation"]
    assert int8.status in (PASSED, VERIFY_FAILED, SLOWER_THAN_FP32) and int8.verification["heads"]
    verify_doc = json.loads((run_dir / "export" / "verify.json").read_text())
    assert verify_doc["formats"]["onnx-int8"]["attempts"] == int8.details["attempts"]
    assert verify_doc["formats"]["onnx-int8"]["quantization"]["chosen"] == quantization["chosen"]
    manifest = read_manifest(run_dir / "export")
    if int8.status == SLOWER_THAN_FP32:  # withheld: slower than fp32 on this machine
        assert int8.measured.images_per_second < result.formats["onnx"].measured.images_per_second
        assert "not offered; serve onnx" in int8.error
    if int8.status in (VERIFY_FAILED, SLOWER_THAN_FP32):
        with pytest.raises(TransferkitError, match="not servable"):
            select_runtime("onnx-int8", manifest, run_dir / "export")
        assert select_runtime("auto", manifest, run_dir / "export").artifact == "onnx"


def test_an_int8_slower_than_its_fp32_is_withheld_with_its_numbers(tmp_path):
    """The rule itself, on the results export_run builds: INT8 that passed the gate but measured slower than the
    same format's fp32 in this export is not offered; faster, failed or unmeasured ones are left as they are."""
    from transferkit.export.pipeline import FormatResult, _withhold_if_slower
    from transferkit.manifest import Measurement

    def result(name, precision, status, img_s):
        measured = Measurement(img_s, 32, "cpu", "onnxruntime (CPUExecutionProvider)", None) if img_s else None
        return FormatResult(name, status, precision, measured=measured)

    fp32 = result("onnx", "fp32", PASSED, 200.0)
    slow, fast = result("onnx-int8", "int8", PASSED, 168.0), result("onnx-int8", "int8", PASSED, 410.0)
    failed, unmeasured = result("onnx-int8", "int8", VERIFY_FAILED, None), result("onnx-int8", "int8", PASSED, None)
    for r, name in ((slow, "slow"), (fast, "fast")):  # both passed the gate, so both got a drift reference
        r.file, r.reference = tmp_path / f"{name}.onnx", f"reference-{name}.npz"
        (tmp_path / r.reference).write_bytes(b"npz")
    for r in (slow, fast, failed, unmeasured):
        _withhold_if_slower(r, fp32)
    assert slow.status == SLOWER_THAN_FP32 and not slow.servable
    assert slow.reference is None and not (tmp_path / "reference-slow.npz").exists()  # only what serves keeps one
    assert fast.reference == "reference-fast.npz" and (tmp_path / fast.reference).is_file()
    assert slow.error.startswith("passed the gate but runs at 0.84x of onnx on this machine (168 vs 200 img/s")
    assert (fast.status, failed.status, unmeasured.status) == (PASSED, VERIFY_FAILED, PASSED)
    alone = result("onnx-int8", "int8", PASSED, 168.0)
    _withhold_if_slower(alone, None)  # no fp32 measured in this export: nothing to compare with
    assert alone.status == PASSED


def test_int8_is_chosen_on_validation_and_gated_on_test(int8_strict):
    """The split the search chooses on is not the one the gate judges: the validation images share no image with
    the test images, and verify.json says which split did what."""
    from transferkit.export import verify
    from transferkit.runs import load_run_model

    run_dir, result = int8_strict
    int8 = result.formats["onnx-int8"]
    assert int8.details["splits"] == {"calibration": "train", "selection": "val", "gate": "test"}
    _, run = load_run_model(run_dir)
    val, test = verify.load_verify_inputs(run, 600, "val"), verify.load_verify_inputs(run, 600, "test")
    assert int8.details["selection_images"] == val.datasets
    assert int8.verification["heads"]["digits"]["datasets"] == test.datasets["digits"]
    val_rows = {row.tobytes() for row in val.batch}
    assert not any(row.tobytes() in val_rows for row in test.batch)
    verify_doc = json.loads((run_dir / "export" / "verify.json").read_text())
    assert verify_doc["formats"]["onnx-int8"]["splits"]["gate"] == "test"


def test_without_fallback_mixed_precision_is_skipped_and_reported(int8_failed):
    run_dir, result = int8_failed
    int8 = result.formats["onnx-int8"]
    assert int8.status == VERIFY_FAILED and "upper 95% bound" in int8.error and not result.ok
    attempts = {a["name"]: a for a in int8.details["attempts"]}
    assert all(attempts[n]["status"] == "skipped: --int8-fallback off" for n in MIXED)
    assert int8.verification["tolerance"] == {
        "max_abs_diff": None,
        "min_top1_agreement": None,
        "max_acc_delta_points": 1.0,
        "confidence": 0.95,
    }
    failed = [d for h in int8.verification["heads"].values() for d in h["per_dataset"].values() if not d["passed"]]
    assert failed and all(d["drop_upper_points"] > 1.0 and d["lost"] > 0 for d in failed)
    assert result.formats["onnx"].status == PASSED


def test_a_failed_artifact_never_blocks_the_others(int8_failed, tmp_path):
    """onnx passed, onnx-int8 failed: the stored model holds exactly what passed, so the run serves (a real
    server answers a real image), builds and benchmarks; re-exporting onnx alone drops the failed entry."""
    import bentoml
    from PIL import Image
    from sklearn.datasets import load_digits

    from transferkit.export import export_run
    from transferkit.export.benchmark import benchmark_run
    from transferkit.manifest import read_manifest
    from transferkit.serving import build_bento, resolve_served_model, start_server
    from transferkit.serving.client import predict_files

    run_dir = copy_run(int8_failed[0], tmp_path / "partial")
    exported = read_manifest(run_dir / "export")
    assert exported.artifacts["onnx-int8"].status == VERIFY_FAILED and "model-int8.onnx" in exported.files
    stored = read_manifest(bentoml.models.get(exported.tag).path)
    assert list(stored.artifacts) == ["onnx"] and list(stored.files) == ["model.onnx", "reference-onnx.npz"]
    assert resolve_served_model(run_dir).runtime == "onnx"

    image = tmp_path / "digit.png"
    Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8), mode="L").resize((64, 64)).save(image)
    with start_server(run_dir) as server:
        answers = predict_files([image], url=server.url, top_k=1)
    assert set(answers[0]["heads"]) == {"digits", "fashion-mnist"}

    rows = {r.format: r for r in benchmark_run(run_dir, repeats=2)}
    assert rows["onnx"].latency_ms[32] > 0 and "not servable" in rows["onnx-int8"].note
    assert read_manifest(run_dir / "export").artifacts["onnx"].measured[-1].by == "benchmark"  # this machine's figure

    assert build_bento(run_dir).tag

    again = export_run(run_dir, formats="onnx", verify_images=64)
    assert list(again.formats) == ["onnx"] and list(read_manifest(run_dir / "export").artifacts) == ["onnx"]


def test_int8_within_the_gate_is_smaller_and_measured(int8_export):
    run_dir, result = int8_export
    int8 = result.formats["onnx-int8"]
    assert int8.status == PASSED, int8.error
    assert int8.verification["tolerance"]["max_acc_delta_points"] == 25.0  # the export's override is recorded
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    entry = manifest["formats"]["onnx-int8"]
    attempts = entry["details"]["attempts"]
    passed = [a for a in attempts if a["status"].startswith("passed on validation")]
    assert passed and entry["details"]["quantization"]["passed_on_validation"]
    best = max(passed, key=lambda a: (a["status"] == "passed on validation", a["images_per_second"]))
    assert entry["details"]["quantization"]["chosen"] == best["name"]
    assert all("speedup_vs_fp32" in a for a in passed)  # every passing attempt is timed against fp32 here
    if not best["mixed_precision"]:
        assert entry["details"]["fp32_layers"] == []
    # int8 weights: the QDQ file is under a third of fp32's size
    assert (run_dir / "export" / "model-int8.onnx").stat().st_size < 0.35 * (
        run_dir / "export" / "model.onnx"
    ).stat().st_size
    measured = entry["measured"][0]
    assert measured["images_per_second"] > 0 and manifest["formats"]["onnx"]["measured"][0]["batch"] == 32
    assert measured["machine"]["cpu"] and measured["by"] == "export" and "load" in measured


def test_int8_is_served_by_artifact_name(int8_export):
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.runtime import OnnxRuntime
    from transferkit.runtimes.selection import load_runtime, select_runtime

    run_dir, _ = int8_export
    export_dir = run_dir / "export"
    manifest = read_manifest(export_dir)
    runtime = load_runtime("onnx-int8", export_dir, manifest, check_files=True)
    assert isinstance(runtime, OnnxRuntime) and runtime.artifact == "onnx-int8" and "onnx-int8" in runtime.description
    out = runtime.run(np.zeros((3, 3, 32, 32), np.float32))
    assert {k: v.shape for k, v in out.items()} == {h: (3, 10) for h in manifest.heads}
    # `onnxruntime` (the runtime) and `auto` take the fastest of its verified artifacts by the measured numbers
    faster = max(("onnx", "onnx-int8"), key=lambda a: manifest.artifacts[a].measured[-1].images_per_second)
    assert select_runtime("onnxruntime", manifest, export_dir).artifact == faster
    assert select_runtime("auto", manifest, export_dir).artifact == faster
    with pytest.raises(ConfigError, match="unknown runtime 'onnx-fp16'; use one of auto, .*onnx, onnx-int8"):
        select_runtime("onnx-fp16", manifest, export_dir)  # the export's own artifacts are listed


def test_a_broken_calibration_fails_every_attempt_and_writes_the_closest(probe_run, tmp_path):
    """Calibrating on one constant image collapses every activation range: no attempt may pass on validation,
    each is recorded, and the file written is the closest attempt's, for the gate to report on."""
    from transferkit.export import verify
    from transferkit.export.formats import FORMATS
    from transferkit.export.job import ExportJob, ExportOptions, SelectionSet
    from transferkit.export.onnx import export_onnx
    from transferkit.export.quantize import quantize_onnx_int8
    from transferkit.model import ExportModule
    from transferkit.runs import load_run_model

    model, run = load_run_model(probe_run)
    module, heads = ExportModule(model).eval(), list(model.head_names)
    val = verify.load_verify_inputs(run, 600, "val")
    options = ExportOptions(int8_fallback="off", qat="off")  # the hard case tests the escalation; keep this short
    selection = SelectionSet(
        val, verify.pytorch_logits(module, val.batch, heads), options.tolerance(FORMATS["onnx"], "int8")
    )
    constant = np.zeros((8, 3, 32, 32), np.float32)
    job = ExportJob(
        module, tmp_path, "int8", "cpu", heads, 32, options=options, calibration=lambda n: constant, selection=selection
    )
    fp32 = tmp_path / "model.onnx"
    export_onnx(module, job.example_input(), fp32, heads)
    details = quantize_onnx_int8(fp32, tmp_path / "model-int8.onnx", job)
    attempts = details["attempts"]
    assert [a["name"] for a in attempts] == FULL_INT8 + MIXED  # a job without a model to fine-tune: no QAT
    assert not details["quantization"]["passed_on_validation"]
    scored = [a for a in attempts if "violation" in a]
    assert all(a["status"] == "failed on validation" for a in scored) and len(scored) >= len(FULL_INT8)
    closest = min(scored, key=lambda a: a["violation"])
    assert details["quantization"]["chosen"] == closest["name"]
    written = verify.onnx_file_logits(tmp_path / "model-int8.onnx", val.batch, heads)
    assert round(selection.violation(written), 4) == closest["violation"]


def test_keeping_a_layer_in_fp32_rewires_it_to_the_fp32_tensors(int8_export):
    import onnx

    from transferkit.export.layer_repair import keep_in_fp32, repairable_layers

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
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.selection import artifact_problem, load_runtime, select_runtime

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
    assert manifest.artifacts["onnx"].status == PASSED  # the earlier fp32 artifact is kept beside it
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

    from transferkit.export.job import ExportJob, ExportOptions
    from transferkit.export.quantize import quantize_for_tensorrt
    from transferkit.export.verify import onnx_file_logits

    run_dir = exported[0]
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    job = ExportJob(
        None,
        tmp_path,
        "int8",
        "cuda",
        ["digits", "fashion-mnist"],
        32,
        options=ExportOptions(calibration_images=16),
        calibration=lambda n: calibration[:n],
    )
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
