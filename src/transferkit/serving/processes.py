"""Process supervision for `transferkit serve` and everything that starts servers: who dies with whom, how a
process tree is stopped (SIGTERM, wait, SIGKILL what is left, reap), and ports.

circus, BentoML's arbiter, starts every worker with setsid(): workers are in sessions and process groups of
their own, so a signal to a process group never reaches them, and once the arbiter dies they are re-parented
and keep serving on the inherited socket. So trees are tracked by ancestry (psutil), the serve process is a
child subreaper (its orphans re-parent to it), and children get SIGTERM when their parent dies
(PR_SET_PDEATHSIG). Linux prctl where available; elsewhere the snapshot of descendants still works.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from transferkit.errors import TransferkitError

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def _libc() -> Any:
    with contextlib.suppress(OSError):
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    return None


# Set in the environment of a server's process tree (every worker inherits it), so that the serving process can
# tell that tree's orphans from its own other children: `transferkit.serve()` runs inside notebooks and
# applications whose processes are not ours to stop.
TREE_ENV = "TRANSFERKIT_SERVER_TREE"


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """Within: orphaned descendants (workers whose arbiter died) re-parent to this process instead of init. The
    flag is put back as it was on the way out, so a Python caller's later orphans go where they went before.
    -> whether it could be set (Linux)."""
    libc = _libc()
    if libc is None:
        yield False
        return
    before = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(before), 0, 0, 0)
    ok = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield ok
    finally:
        if ok and not before.value:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def in_tree(p: psutil.Process, marker: str) -> bool:
    """Whether `p` belongs to the server tree started with TREE_ENV=marker (a process whose environment cannot
    be read is not ours to stop)."""
    try:
        return p.environ().get(TREE_ENV) == marker
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGTERM when this process dies (also by SIGKILL), i.e. a graceful stop."""
    libc, parent = _libc(), os.getpid()
    if libc is None:
        return None

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal would ever come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def descendants(pid: int | None = None) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(p: psutil.Process) -> bool:
    try:  # is_running() also checks the pid was not reused by another process
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(procs: list[psutil.Process]) -> None:
    """Collect exited descendants that are our children now (re-parented ones included) so no zombie stays."""
    for p in procs:
        with contextlib.suppress(OSError):  # ChildProcessError: not (or no longer) our child
            os.waitpid(p.pid, os.WNOHANG)


def stop_tree(
    proc: subprocess.Popen,
    timeout: float,
    orphans: str | None = None,
    hurry: Callable[[], bool] = lambda: False,
) -> list[int]:
    """SIGTERM `proc`, wait until it and every descendant has exited, at most `timeout` s (or until `hurry()`),
    then SIGKILL the rest. -> the pids that had to be killed.

    Descendants are recorded before the signal and while waiting, so a worker re-parented away from the tree
    is still tracked. `orphans`: this process is the subreaper of `proc`'s tree, started with TREE_ENV set to
    this marker, so its other descendants that carry the marker count as well (and are reaped here); the
    caller's own other children do not.
    """

    def scan() -> list[psutil.Process]:
        if not orphans:
            return descendants(proc.pid)
        return [p for p in descendants() if p.pid != proc.pid and in_tree(p, orphans)]

    known = {p.pid: p for p in scan()}
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        for p in scan():
            known.setdefault(p.pid, p)
        if orphans:
            _reap(list(known.values()))
        alive = [p for p in known.values() if _alive(p)]
        if proc.poll() is not None and not alive:
            return []
        if time.monotonic() >= deadline or hurry():
            break
        time.sleep(0.1)
    killed = [p.pid for p in alive] + ([proc.pid] if proc.poll() is None else [])
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        if orphans:
            _reap(alive)
        if not any(_alive(p) for p in alive):
            break
        time.sleep(0.05)
    return killed


def can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server binds (circus sets SO_REUSEADDR): TIME_WAIT connections do not count, a listener does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def check_port(host: str, port: int) -> None:
    if not can_bind(host, port):
        raise TransferkitError(f"cannot listen on {host}:{port} (address in use or not available); pass another --port")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
