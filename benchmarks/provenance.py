"""What every benchmark report records about its source (the commit measured), and how a report is written.

Its own module, free of torch and of training code, so that the serving benchmarks (a client and servers in
other processes) can use it too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from transferkit.utils import atomic_write_text  # torch-free


def commit() -> str:
    """The source commit measured (with `+changes` when tracked files differ from it)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def command_line() -> str:
    """How this benchmark was started, as a report quotes it: `python benchmarks/NAME.py ARGS`."""
    root, script = Path(__file__).resolve().parent.parent, Path(sys.argv[0]).resolve()
    shown = script.relative_to(root) if script.is_relative_to(root) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


def write_report(path: str | Path, lines: list[str]) -> None:
    """Print a benchmark's Markdown report and write it to `path` atomically: a run killed while writing
    leaves the previous report whole."""
    text = "\n".join(lines)
    print(text)
    atomic_write_text(path, text)
    print(f"wrote {path}", file=sys.stderr)


def write_section(path: str | Path, section: str, begin: str, end: str, new_file: str = "") -> None:
    """Replace the block between a benchmark's markers `begin` and `end` in `path` (or append it; a new file
    starts with `new_file`), atomically, keeping the hand-written text around it."""
    path = Path(path)
    text = path.read_text() if path.is_file() else new_file
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    print(f"wrote {path}", file=sys.stderr)
