import json

from tests.export.tiny import copy_run
from tests.helpers import run_cli
from transferkit.export.benchmark import BASELINE, benchmark_run, format_benchmark_table


def test_benchmark_times_every_servable_format_against_pytorch(exported, tmp_path):
    run_dir = copy_run(exported[0], tmp_path / "run")  # benchmark.json must not land in the shared export
    rows = benchmark_run(run_dir, batches=(1, 4), repeats=3)
    by_name = {r.format: r for r in rows}
    assert rows[0].format == BASELINE and set(rows[0].latency_ms) == {1, 4}
    onnx = by_name["onnx"]
    assert onnx.status == "passed" and onnx.size_bytes > 1_000_000
    assert set(onnx.accuracy) == {"digits", "fashion-mnist"} and all(0 <= a <= 1 for a in onnx.accuracy.values())
    assert all(ms > 0 for ms in onnx.latency_ms.values()) and "onnxruntime" in onnx.note
    assert by_name["tensorrt"].latency_ms == {}  # never exported here: listed, not timed
    table = format_benchmark_table(rows, batches=(1, 4))
    assert "vs torch b=4" in table and "onnxruntime" in table
    saved = json.loads((run_dir / "export" / "benchmark.json").read_text())
    assert [r["format"] for r in saved["rows"]] == [r.format for r in rows]


def test_benchmark_cli_needs_an_export(fresh_run):
    proc = run_cli("benchmark", str(fresh_run), check=False)
    assert proc.returncode == 2 and "has not been exported" in proc.stderr
