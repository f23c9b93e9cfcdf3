"""The formats table is the one source: CLI choices, exporters, runners, `auto` order, tolerances, contract."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.export.tiny import manifest_with, with_speed
from transferkit import artifact
from transferkit.artifact import FORMAT_SPECS, PRECISIONS, RUNTIME_NAMES, STATUSES, TOLERANCES, check_device
from transferkit.errors import ConfigError

SRC = Path(artifact.__file__).resolve().parent


def _subparser(name: str) -> argparse.ArgumentParser:
    from transferkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _option(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def test_cli_choices_are_the_tables():
    from transferkit.runtimes.runtime import RUNTIME_CHOICES

    export = _subparser("export")
    fmt = _option(export, "format")
    listed = re.fullmatch(r"\{(.*)\}\[,\.\.\.\]", fmt.metavar).group(1).split(",")
    assert listed == list(FORMAT_SPECS) and fmt.default in FORMAT_SPECS
    precision = _option(export, "precision")
    assert re.fullmatch(r"\{(.*)\}\[,\.\.\.\]", precision.metavar).group(1).split(",") == list(PRECISIONS)
    assert set(PRECISIONS) == {p for s in FORMAT_SPECS.values() for p in s.precisions}
    assert precision.default == PRECISIONS[0]
    runtime = _option(_subparser("serve"), "runtime")  # runtimes from the table, plus the export's artifact names
    assert re.fullmatch(r"\{(.*)\} or ARTIFACT", runtime.metavar).group(1).split(",") == list(RUNTIME_CHOICES)
    assert RUNTIME_CHOICES == ("auto", *RUNTIME_NAMES)
    assert sorted(RUNTIME_NAMES) == sorted(s.runtime for s in FORMAT_SPECS.values())
    text = re.sub(r"\s", "", export.format_help())  # --help wraps lines (also at hyphens)
    for spec in FORMAT_SPECS.values():
        assert re.sub(r"\s", "", f"{spec.name}: {spec.description}") in text


def test_every_row_has_an_exporter_and_a_runner():
    from transferkit.export.formats import EXPORTERS, FORMATS
    from transferkit.runtimes.runtime import RUNTIMES

    assert list(FORMATS) == list(EXPORTERS) == list(FORMAT_SPECS)
    for name, spec in FORMAT_SPECS.items():
        row = FORMATS[name]
        assert callable(row.export) and callable(row.unavailable)
        assert (row.filename, row.runtime, row.devices, row.precisions) == (
            spec.filename,
            spec.runtime,
            spec.devices,
            spec.precisions,
        )
        for precision in row.precisions:  # what an artifact is built from is itself an artifact of the table
            for fmt, dep_precision in row.requires(precision):
                assert (fmt, dep_precision) != (name, precision) and dep_precision in FORMAT_SPECS[fmt].precisions
        runner = RUNTIMES[spec.runtime]
        assert runner.format == name and runner.name == spec.runtime
    assert len(RUNTIMES) == len(FORMAT_SPECS)  # one runner per row, no runner without a row


def test_rows_are_complete():
    for spec in FORMAT_SPECS.values():
        assert spec.precisions and set(spec.devices) <= {"cpu", "gpu"} and spec.devices
        assert spec.description and ";" not in spec.description
    ranks = [s.auto_rank for s in FORMAT_SPECS.values()]
    assert len(set(ranks)) == len(ranks)
    assert len(set(STATUSES)) == len(STATUSES)


def test_tolerances_come_from_the_table():
    from transferkit.export import verify

    assert verify.TOLERANCES is TOLERANCES and verify.Tolerance is artifact.Tolerance
    assert "Tolerance(" not in (SRC / "export" / "verify.py").read_text()
    for spec in FORMAT_SPECS.values():
        assert spec.tolerances == {p: TOLERANCES[p] for p in spec.precisions}

    # compare() holds a format to the tolerance it is given (pipeline passes the row's)
    n = 100
    ref = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    labels = ref.argmax(1)
    inputs = verify.VerifyInputs(
        np.zeros((n, 3, 8, 8), np.float32), {"h": np.arange(n)}, {"h": labels}, {"h": {"d": n}}
    )
    shifted = {"h": ref + np.float32(0.01 * np.abs(ref).max())}
    assert not verify.compare({"h": ref}, shifted, inputs, "fp32")["passed"]
    report = verify.compare({"h": ref}, shifted, inputs, "fp32", TOLERANCES["fp16"])
    assert report["passed"] and report["tolerance"]["max_abs_diff"] == TOLERANCES["fp16"].max_abs_diff


def _definitions(pattern: str) -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for line in path.read_text().splitlines():
            if re.match(pattern, line):
                found.append(f"{path.relative_to(SRC)}: {line.strip()}")
    return found


def _constants(path: Path) -> set:
    """Literal values in the code (a docstring is one long string constant, so its examples do not count)."""
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}


def test_input_name_and_batch_range_have_one_definition():
    from transferkit.serving.settings import MAX_BATCH_CEILING

    assert _definitions(r"\s*INPUT_NAME\s*=") == ['artifact.py: INPUT_NAME = "images"']
    assignment = r"\s*(\w+\s*,\s*)*MAX_BATCH\s*(,\s*\w+\s*)*=(?!=)"
    assert _definitions(assignment) == ["artifact.py: MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 64"]
    assert MAX_BATCH_CEILING == artifact.MAX_BATCH
    for name in ("runtimes/runtime.py", "manifest.py", "export/onnx.py", "export/tensorrt.py", "export/aoti.py"):
        assert _constants(SRC / name) & {"images", 64} == set(), name


def test_exporters_do_not_import_the_formats_table():
    """onnx/aoti/tensorrt get what they need as arguments: no import circle with export/formats.py."""
    for name in ("onnx.py", "aoti.py", "tensorrt.py"):
        tree = ast.parse((SRC / "export" / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "transferkit.export.formats" not in imported and "transferkit.export.pipeline" not in imported, name


def test_contract_module_imports_nothing_heavy():
    code = (
        "import sys\n"
        "for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'tensorrt', 'openvino', 'nncf'): sys.modules[m] = None\n"
        "import transferkit.artifact\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize(
    "ort_gpu, aoti_device, order",
    [
        (False, "cpu", ["tensorrt", "onnxruntime", "torch"]),
        (True, "cpu", ["tensorrt", "onnxruntime", "torch"]),
        (True, "cuda", ["tensorrt", "onnxruntime", "torch"]),
        (False, "cuda", ["tensorrt", "torch", "onnxruntime"]),
    ],
)
def test_auto_order_from_devices_and_rank(monkeypatch, ort_gpu, aoti_device, order):
    from transferkit.runtimes.runtime import OnnxRuntime
    from transferkit.runtimes.selection import auto_order

    monkeypatch.setattr(OnnxRuntime, "gpu_available", staticmethod(lambda: ort_gpu))
    manifest = manifest_with(onnx={}, aoti={"device": aoti_device}, tensorrt={})
    runtime_of = {"onnx": "onnxruntime", "aoti": "torch", "tensorrt": "tensorrt"}
    assert [runtime_of[a] for a in auto_order(manifest)] == order


def test_auto_order_prefers_measured_throughput_on_the_same_device(monkeypatch):
    """On a CPU, the fastest artifact measured on this machine goes first, whatever the table's rank;
    unmeasured ones come after measured ones; a GPU artifact still comes before any CPU one."""
    from transferkit.runtimes.runtime import OnnxRuntime
    from transferkit.runtimes.selection import auto_order

    monkeypatch.setattr(OnnxRuntime, "gpu_available", staticmethod(lambda: False))
    manifest = manifest_with(
        onnx={"speed": 1000},
        aoti={"speed": 1200},
        tensorrt={},
        **{"onnx-int8": {"precision": "int8", "speed": 1500}, "onnx-fp16": {"precision": "fp16"}},
    )
    assert auto_order(manifest) == ["tensorrt", "onnx-int8", "aoti", "onnx", "onnx-fp16"]
    # a number measured on a GPU says nothing about this CPU: it is ignored, and onnx falls back to its rank
    manifest = manifest_with(
        onnx={"speed": 99999, "measured_on": "gpu"},
        aoti={"speed": 1200},
        tensorrt={},
        **{"onnx-int8": {"precision": "int8", "speed": 1500}, "onnx-fp16": {"precision": "fp16"}},
    )
    assert auto_order(manifest) == ["tensorrt", "onnx-int8", "aoti", "onnx", "onnx-fp16"]
    assert auto_order(with_speed(manifest, "onnx", 99999))[:2] == ["tensorrt", "onnx"]


def test_auto_trusts_only_speeds_measured_on_a_machine_like_this_one(monkeypatch):
    """An INT8 figure from a CPU with VNNI says nothing about one without: a measurement from another kind of
    machine is ignored, and the reason names this machine and how to measure here."""
    from transferkit.machine import Machine
    from transferkit.runtimes.runtime import OnnxRuntime
    from transferkit.runtimes.selection import auto_order, select_runtime

    monkeypatch.setattr(OnnxRuntime, "gpu_available", staticmethod(lambda: False))
    here = Machine.this()
    other = Machine("Some Other CPU", ("avx2", "avx512_vnni"), here.cores + 14)
    manifest = manifest_with(onnx={"speed": 1000}, **{"onnx-int8": {"precision": "int8"}})
    manifest = with_speed(manifest, "onnx-int8", 5000, machine=other)
    assert auto_order(manifest) == ["onnx", "onnx-int8"]
    chosen = select_runtime("auto", manifest)
    assert chosen.artifact == "onnx" and "onnx 1,000 img/s" in chosen.selected_because
    bare = manifest_with(onnx={}, **{"onnx-int8": {"precision": "int8"}})
    bare = with_speed(bare, "onnx-int8", 5000, machine=other)
    because = select_runtime("auto", bare).selected_because
    assert "no servable artifact was measured on a machine like this one" in because and here.cpu in because
    # measured here: that figure counts, and replaces no figure from the other machine
    both = with_speed(with_speed(bare, "onnx-int8", 800), "onnx", 700)
    assert auto_order(both) == ["onnx-int8", "onnx"] and len(both.artifacts["onnx-int8"].measured) == 2


@pytest.mark.parametrize("device, kind", [("cpu", "cpu"), ("cuda", "gpu"), ("cuda:1", "gpu")])
def test_check_device_kinds(device, kind):
    assert check_device(device) == kind and check_device(device, allow_auto=True) == kind
    assert check_device("auto", allow_auto=True) == "auto"


@pytest.mark.parametrize("device", ["tpu", "auto", "cuda:", "cuda:x", "CPU", " cpu"])
def test_check_device_refuses(device):
    with pytest.raises(ConfigError, match=r"^device must be cpu, cuda or cuda:N, got "):
        check_device(device)


def test_text_table_layout():
    from transferkit.errors import message_on_one_line, one_line
    from transferkit.export.table import text_table

    assert text_table(["a", "bb"], [["xyz", ""], ["1", "2"]]) == "a    bb\n---  --\nxyz\n1    2"
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert len(one_line(ValueError("x" * 900))) == 500
    assert message_on_one_line(ValueError("problem,\n  and the fix")) == "problem, and the fix"
