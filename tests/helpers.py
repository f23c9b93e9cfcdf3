"""Helpers shared by tests (import as `from tests.helpers import run_cli`)."""
from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m transferkit ARGS` as a user would; returns the completed process."""
    proc = subprocess.run(
        [sys.executable, "-m", "transferkit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"transferkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc
