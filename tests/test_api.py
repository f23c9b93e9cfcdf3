"""docs/api.md's example runs as written: the Python API trains, exports, evaluates and serves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def test_the_documented_example_runs_as_written(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "passed", proc.stdout[-2000:]
    assert "mirrored-digits" in proc.stdout  # the evaluation table names the registered dataset
    assert lines[-1].startswith("{") and "'label'" in lines[-1] and "'score'" in lines[-1], lines[-1]
