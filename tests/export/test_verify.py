"""Verify (exported formats against PyTorch): tolerances on synthetic logits, and a tampered ONNX file that must not be served."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.export.tiny import VERIFY_IMAGES, copy_run
from transferkit.errors import TransferkitError
from transferkit.export import PASSED, VERIFY_FAILED, verify_export
from transferkit.export.verify import VerifyInputs, compare


def _inputs(n: int = 200, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, classes)).astype(np.float32) * 3
    labels = logits.argmax(1).copy()
    labels[: n // 2] = rng.integers(0, classes, n // 2)  # ~55% accuracy
    inputs = VerifyInputs(np.zeros((n, 3, 8, 8), np.float32), {"h": np.arange(n)}, {"h": labels}, {"h": {"d": n}})
    return {"h": logits}, inputs


def test_identical_logits_pass():
    ref, inputs = _inputs()
    report = compare(ref, {"h": ref["h"].copy()}, inputs, "fp32")
    assert report["passed"] and report["heads"]["h"]["max_abs_diff"] == 0.0


def test_small_noise_passes_fp32_but_large_noise_fails():
    ref, inputs = _inputs()
    scale = np.abs(ref["h"]).max()
    tiny = ref["h"] + np.float32(1e-4 * scale)
    assert compare(ref, {"h": tiny}, inputs, "fp32")["passed"]
    noisy = ref["h"] + np.random.default_rng(1).standard_normal(ref["h"].shape).astype(np.float32) * 0.05 * scale
    report = compare(ref, {"h": noisy}, inputs, "fp32")
    assert not report["passed"] and any("max |logit diff|" in f for f in report["failures"])
    assert compare(ref, {"h": ref["h"] + np.float32(0.01 * scale)}, inputs, "fp16")["passed"]


def test_flipped_predictions_fail_agreement_and_accuracy():
    ref, inputs = _inputs()
    flipped = ref["h"].copy()
    flipped[:20] = -flipped[:20]  # 10% of the images change their top-1
    report = compare(ref, {"h": flipped}, inputs, "fp32")
    text = " ".join(report["failures"])
    assert not report["passed"] and "top-1 agreement" in text
    assert report["heads"]["h"]["top1_agreement"] == pytest.approx(0.9)


def test_non_finite_logits_fail():
    ref, inputs = _inputs()
    bad = ref["h"].copy()
    bad[0, 0] = np.nan
    assert "non-finite" in " ".join(compare(ref, {"h": bad}, inputs, "fp32")["failures"])


def test_tampered_onnx_fails_verify_and_is_not_servable(exported, tmp_path):
    from transferkit.serving.server import resolve_served_model

    run_dir = copy_run(exported[0], tmp_path / "tampered")
    path = run_dir / "export" / "model.onnx"
    model = onnx.load(str(path))
    # Perturb the digits head's bias: the file stays a valid model but its logits disagree with model.pt.
    name = next(i.name for i in model.graph.initializer if "digits" in i.name and "bias" in i.name)
    init = next(i for i in model.graph.initializer if i.name == name)
    bias = numpy_helper.to_array(init).copy()
    bias[3] += 4.0
    init.CopyFrom(numpy_helper.from_array(bias, name))
    onnx.save(model, str(path))

    result = verify_export(run_dir, verify_images=VERIFY_IMAGES)
    onnx_result = result.formats["onnx"]
    assert onnx_result.status == VERIFY_FAILED and not onnx_result.servable and not result.ok
    assert "digits" in onnx_result.error and "fashion" not in onnx_result.error  # only the tampered head fails
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["formats"]["onnx"]["servable"] is False and manifest["bentoml"] is None
    report = json.loads((run_dir / "export" / "verify.json").read_text())["formats"]["onnx"]
    assert not report["heads"]["digits"]["passed"] and report["heads"]["fashion-mnist"]["passed"]
    with pytest.raises(TransferkitError, match="no exported format passed verification"):
        resolve_served_model(run_dir)


def test_reverify_of_an_untouched_export_keeps_its_tag(exported, tmp_path):
    run_dir = copy_run(exported[0], tmp_path / "untouched")
    result = verify_export(run_dir, verify_images=VERIFY_IMAGES)
    assert result.ok and result.formats["onnx"].status == PASSED
    assert result.bentoml_tag == exported[1].bentoml_tag


def test_the_pytorch_reference_is_the_eager_models_logits_traced_or_not():
    """The reference runs a frozen trace (BatchNorm folded) where the trace gives the eager model's logits, and
    the eager model where it does not: the numbers are the model's either way."""
    import torch

    from transferkit.export.verify import pytorch_logits, reference_runner
    from transferkit.model import ExportModule, build_model

    torch.manual_seed(0)
    model = ExportModule(build_model("mobilenet_v2", "none", {"h": list("abc")}, image_size=32)).eval()
    batch = np.random.default_rng(0).standard_normal((70, 3, 32, 32)).astype(np.float32)  # two calls of BATCH
    with torch.no_grad():
        eager = model(torch.from_numpy(batch))[0].numpy()
    assert isinstance(reference_runner(model, batch[:3]), torch.jit.ScriptModule)
    got = pytorch_logits(model, batch, ["h"])["h"]
    assert got.shape == eager.shape and np.abs(got - eager).max() <= 1e-4 * max(1.0, np.abs(eager).max())

    class BatchDependent(torch.nn.Module):  # Python control flow a trace bakes in for the traced batch size
        def forward(self, x):
            return (x.flatten(1)[:, :3] * (2.0 if x.shape[0] == 2 else 1.0),)

    odd = BatchDependent().eval()
    assert not isinstance(reference_runner(odd, batch[:3]), torch.jit.ScriptModule)
    assert np.array_equal(pytorch_logits(odd, batch, ["h"])["h"], batch.reshape(70, -1)[:, :3])


class _Runner:
    """A runtime's run(): logits that are the image's mean, or, with `alone_differs`, other numbers for a batch
    of one image (as OpenVINO's CPU plugin gave for an NNCF INT8 IR before runtimes/runtime.py paired them)."""

    heads = ["h"]

    def __init__(self, alone_differs: bool) -> None:
        self.alone_differs = alone_differs

    def run(self, batch):
        import numpy as np

        logits = np.repeat(batch.reshape(len(batch), -1).mean(1, keepdims=True), 3, axis=1) * 10
        return {"h": logits + (7.0 if self.alone_differs and len(batch) == 1 else 0.0)}


def test_the_gate_fails_an_artifact_whose_single_images_get_other_logits():
    import numpy as np

    from transferkit.export.verify import single_image_failure

    batch = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    for alone_differs, expected in ((False, None), (True, "one image alone gets other logits")):
        runner = _Runner(alone_differs)
        failure = single_image_failure(runner, batch, runner.run(batch))
        assert (failure is None) if expected is None else (expected in failure), failure
