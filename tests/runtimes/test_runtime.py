"""Runtimes on the exported ONNX: selection rules, refusal of unverified formats, batch handling."""

import dataclasses

import numpy as np
import pytest

from transferkit.errors import ConfigError, TransferkitError
from transferkit.manifest import read_manifest
from transferkit.runtimes.runtime import OnnxRuntime
from transferkit.runtimes.selection import load_runtime, select_runtime


@pytest.fixture(scope="module")
def manifest(exported):
    return read_manifest(exported[0] / "export")


def test_onnxruntime_runs_any_batch_and_returns_every_head(exported, manifest):
    runtime = load_runtime("onnxruntime", exported[0] / "export", manifest)
    assert "onnxruntime" in runtime.description
    for n in (1, 7):
        out = runtime.run(np.zeros((n, 3, 32, 32), np.float32))
        assert set(out) == {"digits", "fashion-mnist"} and out["digits"].shape == (n, 10)
        assert out["digits"].dtype == np.float32
    runtime.max_batch = 4  # chunking: 10 images in 4+4+2 give the same logits as one call
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    chunked = runtime.run(x)
    runtime.max_batch = None
    np.testing.assert_allclose(chunked["digits"], runtime.run(x)["digits"], atol=1e-5)


def test_wrong_input_is_refused(exported, manifest):
    runtime = load_runtime("onnxruntime", exported[0] / "export", manifest)
    with pytest.raises(ValueError, match="float32 batch"):
        runtime.run(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="float32 batch"):
        runtime.run(np.zeros((1, 32, 32, 3), np.uint8))


def test_auto_picks_onnxruntime_here_and_explicit_choices_explain_themselves(exported, manifest):
    export_dir = exported[0] / "export"
    assert isinstance(select_runtime("auto", manifest, export_dir), OnnxRuntime)
    with pytest.raises(TransferkitError, match="no tensorrt artifact"):
        select_runtime("tensorrt", manifest, export_dir)
    with pytest.raises(TransferkitError, match="no aoti artifact"):
        select_runtime("torch", manifest, export_dir)
    with pytest.raises(ConfigError, match="auto, tensorrt, onnxruntime, torch"):
        select_runtime("tflite", manifest, export_dir)


def test_a_format_that_failed_verification_is_never_selected(exported, manifest):
    failed = manifest.with_artifact(
        dataclasses.replace(manifest.artifacts["onnx"], status="export ok but verification failed")
    )
    for name in ("auto", "onnxruntime"):
        with pytest.raises(TransferkitError, match="not servable"):
            select_runtime(name, failed, exported[0] / "export")


def test_serving_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import transferkit.serving, transferkit.runtimes.runtime, transferkit.serving.http_app, transferkit.serving.batcher\n"
        "import transferkit.preprocess, transferkit.manifest, transferkit.machine\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


ARENA_SCRIPT = """
import sys
import numpy as np, onnx, psutil
from onnx import TensorProto, helper
from transferkit.runtimes.runtime import onnx_session, share_cpu_arena

if sys.argv[1] == "shared":
    share_cpu_arena()
weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 3, 3, 3], np.full(64 * 27, 0.01, np.float32).tolist())
conv = helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1])
pooled = helper.make_node("GlobalAveragePool", ["c"], ["y"])
graph = helper.make_graph(
    [conv, pooled], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 3, 256, 256])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64, 1, 1])], [weight],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
x = np.random.default_rng(0).random((8, 3, 256, 256), np.float32)
before = psutil.Process().memory_info().rss
outputs = []
for _ in range(3):
    session = onnx_session(model, threads=1)
    outputs.append(session.run(None, {"x": x})[0])
    outputs.append(session)
grown = psutil.Process().memory_info().rss - before
assert np.allclose(outputs[0], outputs[2]) and np.allclose(outputs[0], outputs[4])
print(grown >> 20)
"""


def test_sessions_of_a_worker_share_one_cpu_arena_and_answer_the_same():
    """Three sessions of a graph whose activation is 134 MB: each with its own arena, the process grows by about
    three such activations; sharing the environment's arena (a serving worker, share_cpu_arena), by about one."""
    import subprocess
    import sys

    grown = {
        kind: int(
            subprocess.run(
                [sys.executable, "-c", ARENA_SCRIPT, kind], capture_output=True, text=True, check=True
            ).stdout
        )
        for kind in ("own", "shared")
    }
    assert grown["own"] > 300 and grown["shared"] < 200, grown
