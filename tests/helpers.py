"""Helpers shared by tests (import as `from tests.helpers import run_cli`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

# command-line fragments of the server processes a test may start: the CLI, BentoML's arbiter, its workers
SERVER_COMMANDS = ("transferkit serve", "bentoml serve", "_bentoml_impl.worker")
# set by tests/conftest.py to a value unique to the test session; every process a test starts inherits it
SESSION_ENV = "PYTEST_TRANSFERKIT_SESSION"


def run_cli(
    *args: str, check: bool = True, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
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


def server_processes(since: float, marks: Mapping[str, str]) -> list:
    """Live server processes (SERVER_COMMANDS) created at or after `since` (a time.time()) whose environment
    has any of `marks` (name -> value): those a test session started, not another session's on this machine.
    A process whose environment cannot be read is left out: it cannot be told apart, so it is never killed."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "create_time", "status"]):
        try:
            command = " ".join(proc.info["cmdline"] or [])
            if proc.info["create_time"] < since or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.pid == os.getpid() or not any(fragment in command for fragment in SERVER_COMMANDS):
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if any(env.get(name) == value for name, value in marks.items()):
            found.append(proc)
    return found
