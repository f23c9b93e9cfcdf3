"""Quantization-aware INT8: fine-tuned on the run's train splits only, exported to OpenVINO IR and QDQ ONNX that
both match the fine-tuned PyTorch model, and reached by the export's search (`--qat always`)."""

import numpy as np
import pytest

from tests.export.tiny import copy_run
from transferkit.artifact import PASSED, SLOWER_THAN_FP32, VERIFY_FAILED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qat_model(probe_run):
    """The probe run's model with NNCF's quantizers, fine-tuned for a few steps, and what was done."""
    from transferkit.export import verify
    from transferkit.export.qat import QuantizationAware
    from transferkit.runs import load_run_model

    model, run = load_run_model(probe_run)
    qat = QuantizationAware(run, model, list(verify.dataset_sources(run).values()), steps=6)
    quantized, record = qat.trained(verify.load_calibration_images(run, 32), lambda: None, budget_s=300)
    return run, quantized, record


def test_qat_trains_within_its_steps_and_says_what_it_did(qat_model):
    _, _, record = qat_model
    training = record["training"]
    assert training["steps"] == 6 and training["stopped"] == "steps" and training["images"] > 0
    assert 0 < training["lr"] < 1e-3 and np.isfinite(training["loss_last"])
    assert record["trained_on"] == "train split of digits, fashion-mnist"


def test_the_qat_exports_load_in_both_runtimes_and_match_pytorch(qat_model):
    """The IR (FakeQuantize) and the QDQ ONNX file compute what the fine-tuned PyTorch model computes: the same
    accuracy on held-out images, the same label on nearly all (the runtimes' INT8 kernels round where PyTorch's
    fake quantizers compute in float: a near-tie may flip), logits within a fraction of their scale."""
    import openvino as ov
    import torch

    from transferkit.export import verify
    from transferkit.export.openvino import to_openvino
    from transferkit.export.qat import to_onnx_qdq
    from transferkit.model import ExportModule
    from transferkit.runtimes.runtime import onnx_session

    run, quantized, _ = qat_model
    heads, size = list(run.labels.heads), run.preprocessing.image_size
    inputs = verify.load_verify_inputs(run, 256)
    with torch.inference_mode():
        outputs = ExportModule(quantized).eval()(torch.from_numpy(inputs.batch))
    expected = dict(zip(heads, (t.numpy() for t in outputs)))
    compiled = ov.Core().compile_model(to_openvino(quantized, heads, size), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled(inputs.batch)
    from_ov = {h: np.asarray(out[next(o for o in compiled.outputs if h in o.get_names())]) for h in heads}
    qdq = to_onnx_qdq(quantized, heads, size)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qdq.graph.node}
    from_onnx = dict(zip(heads, onnx_session(qdq.SerializeToString()).run(heads, {"images": inputs.batch})))
    for got in (from_ov, from_onnx):
        for h, rows in inputs.rows.items():
            ref, new, y = expected[h][rows], got[h][rows], inputs.labels[h]
            assert float((new.argmax(1) == ref.argmax(1)).mean()) >= 0.9, h
            assert abs(float((new.argmax(1) == y).mean()) - float((ref.argmax(1) == y).mean())) <= 0.03, h
            assert np.abs(new - ref).max() <= 0.15 * max(1.0, np.abs(ref).max()), h


def test_qat_never_reads_the_validation_or_test_split(probe_run, monkeypatch):
    """Every split but train is replaced by one that fails when touched: QAT still trains."""
    import dataclasses

    import transferkit.training.setup as setup_module
    from transferkit.export import verify
    from transferkit.export.qat import QuantizationAware
    from transferkit.runs import load_run_model

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"QAT read a held-out split ({name})")

        def __len__(self):
            raise AssertionError("QAT read a held-out split (len)")

    real = setup_module.load_dataset

    def train_only(*args, **kwargs):
        return dataclasses.replace(real(*args, **kwargs), val=Untouchable(), test=Untouchable())

    monkeypatch.setattr(setup_module, "load_dataset", train_only)
    model, run = load_run_model(probe_run)
    calibration = verify.load_calibration_images(run, 16)  # train images, loaded before the patch matters
    qat = QuantizationAware(run, model, list(verify.dataset_sources(run).values()), steps=2)
    _, record = qat.trained(calibration, lambda: None, budget_s=300)
    assert record["training"]["steps"] == 2


def test_export_with_qat_always_builds_both_int8_formats_from_one_fine_tuning(probe_run, tmp_path):
    from transferkit.export import export_run
    from transferkit.export.job import ExportOptions

    run_dir = copy_run(probe_run, tmp_path / "run")
    options = ExportOptions(qat="always", qat_steps=8, calibration_images=32, int8_fallback="off")
    result = export_run(run_dir, formats="onnx,openvino", precision="int8", verify_images=600, options=options)
    records = {}
    for name in ("onnx-int8", "openvino-int8"):
        artifact = result.formats[name]
        attempts = {a["name"]: a for a in artifact.details["attempts"]}
        qat = attempts["qat"]
        assert qat["quantization_aware"] and qat["status"].startswith(("passed on validation", "failed on"))
        assert all(
            a["status"].startswith("skipped: --qat always")
            for a in attempts.values()
            if not a["quantization_aware"] and not a["mixed_precision"]
        )
        assert artifact.details["quantization"]["chosen"] == "qat"
        assert artifact.status in (PASSED, VERIFY_FAILED, SLOWER_THAN_FP32)
        heads = artifact.verification["heads"]
        assert all(d["drop_upper_points"] is not None for h in heads.values() for d in h["per_dataset"].values())
        records[name] = qat["qat"]["training"]
    assert records["onnx-int8"] == records["openvino-int8"]  # trained once, shared by both searches


def test_qat_is_planned_from_its_first_step_and_skipped_when_too_few_steps_fit(probe_run):
    """The first step's time plans the run (its cosine ends at zero within the budget); a budget that fits fewer
    than QAT_MIN_STEPS skips training for every search of the export, after one step, not after the budget."""
    from transferkit.export import verify
    from transferkit.export.int8 import BudgetSpent
    from transferkit.export.qat import QuantizationAware
    from transferkit.runs import load_run_model
    from transferkit.training.qat import QAT_MIN_STEPS, QatWontFit, _steps_that_fit

    assert _steps_that_fit(0.5, 60, 100) == 100  # all of --qat-steps fits
    assert _steps_that_fit(2.0, 60, 100) == 30  # what fits, at least QAT_MIN_STEPS
    assert _steps_that_fit(6.0, 60, 5) == 5  # a user's --qat-steps below the minimum is theirs to ask for
    with pytest.raises(QatWontFit, match=f"fit 10 steps, fewer than the {QAT_MIN_STEPS}"):
        _steps_that_fit(6.0, 60, 100)

    model, run = load_run_model(probe_run)
    qat = QuantizationAware(run, model, list(verify.dataset_sources(run).values()), steps=100)
    calibration = verify.load_calibration_images(run, 32)
    with pytest.raises(BudgetSpent, match="skipped: a quantization-aware step takes"):
        qat.trained(calibration, lambda: None, budget_s=0.01)
    with pytest.raises(BudgetSpent, match="skipped: a quantization-aware step takes"):  # not trained again
        qat.trained(calibration, lambda: None, budget_s=600)
