"""GPU formats: AOTInductor compiled for CUDA, and TensorRT engines (fp32, fp16) where TensorRT is installed.

Skipped with the reason on machines without CUDA / TensorRT. Weights "none" and the digits dataset only, so
the test needs no download and no Debian data package.
"""

import numpy as np
import pytest

from tests.export.tiny import DIGITS, make_tiny_run
from transferkit.manifest import read_manifest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def run_dir(tmp_path):
    return make_tiny_run(tmp_path / "gpu-run", weights="none", heads={"digits": DIGITS})


def test_aoti_for_cuda_passes_verify_and_serves_on_cuda(run_dir):
    from transferkit.export import PASSED, export_run, format_export_table
    from transferkit.runtimes.runtime import OnnxRuntime, TorchRuntime
    from transferkit.runtimes.selection import load_runtime

    result = export_run(run_dir, formats=("onnx", "aoti"), device="cuda", verify_images=128, store=False)
    print(format_export_table(result))
    assert result.formats["onnx"].status == PASSED, result.formats["onnx"].error
    assert result.formats["aoti"].status == PASSED, result.formats["aoti"].error
    manifest = read_manifest(run_dir / "export")
    assert manifest.artifacts["aoti"].device == "cuda"
    runtime = load_runtime("auto", run_dir / "export", manifest)
    expected = OnnxRuntime if OnnxRuntime.gpu_available() else TorchRuntime  # CUDA code beats ORT on CPU
    assert isinstance(runtime, expected)
    out = load_runtime("torch", run_dir / "export", manifest).run(np.zeros((5, 3, 32, 32), np.float32))
    assert out["digits"].shape == (5, 10)


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_engine_passes_verify(run_dir, precision):
    from transferkit.export import PASSED, export_run, format_export_table
    from transferkit.export.tensorrt import tensorrt_unavailable_reason
    from transferkit.runtimes.runtime import TensorRTRuntime
    from transferkit.runtimes.selection import load_runtime

    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from transferkit.artifact import artifact_name

    result = export_run(run_dir, formats=("tensorrt",), precision=precision, verify_images=128, store=False)
    print(format_export_table(result))
    name = artifact_name("tensorrt", precision)
    assert list(result.formats) == ["onnx", name] and not result.formats["onnx"].requested
    trt = result.formats[name]
    if precision == "int8":  # random heads make near-ties: the gate may reject INT8 here, with its numbers
        assert trt.status in (PASSED, "export ok but verification failed"), trt.error
        assert trt.verification["heads"] and trt.details["quantization"]["activations"] == "int8 symmetric"
        if trt.status != PASSED:
            return
    assert trt.status == PASSED, trt.error
    assert trt.details["built_for_gpu"]["name"] == torch.cuda.get_device_name()
    manifest = read_manifest(run_dir / "export")
    assert manifest.artifacts[name].built_for_gpu == torch.cuda.get_device_name()
    assert manifest.artifacts[name].batch_range == (1, 64)
    runtime = load_runtime("auto", run_dir / "export", manifest)
    assert isinstance(runtime, TensorRTRuntime)
    out = runtime.run(np.zeros((70, 3, 32, 32), np.float32))  # > the profile's max batch: chunked
    assert out["digits"].shape == (70, 10)
