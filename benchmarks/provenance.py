"""What every benchmark report records about its source: the commit measured.

Its own module, free of torch and of the project, so that the serving benchmarks (a client and servers in
other processes) can record it without importing training code."""
from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str:
    """The source commit measured (with `+changes` when tracked files differ from it)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
