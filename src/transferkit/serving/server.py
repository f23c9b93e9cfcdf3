"""Run the BentoML server for an exported run: in the foreground (`serve`) or in the background (`start_server`).

`serve` checks the run (exported, verified, in the model store, files matching their sha256), then runs
`bentoml serve transferkit.serving.service:TransferkitService` as a child with the ServingSettings in its
environment (settings.py: the only channel to the worker processes, and it keeps the API key out of argv).

The process tree is `transferkit serve` -> `bentoml serve` (circus arbiter) -> one worker per process, and
circus starts every worker with setsid(): workers are in sessions and process groups of their own, so a
signal to our process group never reaches them, and once the arbiter dies they are re-parented and keep
serving on the inherited socket. Hence the lifecycle here:

- the serve process is a child subreaper (Linux), so orphaned workers re-parent to it and stay findable;
- the arbiter runs in its own session (terminal signals reach only us; we decide what it gets) and gets
  SIGTERM when we die, even by SIGKILL (PR_SET_PDEATHSIG);
- SIGTERM/SIGINT/SIGHUP -> SIGTERM to the arbiter, which SIGTERMs the workers; each worker drains (drain.py:
  /readyz 503, new requests 503 with `Connection: close`, accepted ones finish, until quiet or the drain's
  share of `--drain-timeout`), then uvicorn stops accepting and cancels what is left after
  `--timeout-graceful-shutdown` (split_drain; circus itself would wait a day) and exits; whatever is left at
  the drain deadline is SIGKILLed, reaped, and the port is checked free. A second signal skips the rest.

`start_server` runs that same CLI (`python -m transferkit serve`) in the background for tests and scripts.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from transferkit.errors import ConfigError, TransferkitError
from transferkit.serving.resolve import ServedModel, resolve_served_model
from transferkit.serving.settings import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    MODEL_ENV,
    PREFIX,
    ServingSettings,
    read_api_key_file,
)

__all__ = ["MODEL_ENV", "ServedModel", "ServerHandle", "free_port", "resolve_served_model", "serve", "start_server"]

SERVICE = "transferkit.serving.service:TransferkitService"
DEFAULT_DRAIN_TIMEOUT = 10.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# ServingSettings field -> `transferkit serve` option (the model comes from RUN, the key never goes in argv)
SETTING_FLAGS = {"runtime": "--runtime", "workers": "--workers", "threads": "--threads", "max_batch": "--max-batch",
                 "max_wait_ms": "--max-wait-ms", "max_queue": "--max-queue", "max_images": "--max-images",
                 "timeout_s": "--timeout"}  # fmt: skip
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def build_settings(
    settings: ServingSettings | None = None, api_key_file: str | Path | None = None, **overrides: Any
) -> ServingSettings:
    """ServingSettings from (lowest first) defaults, $TRANSFERKIT_* (unless `settings` is given), then
    `overrides` (None means not given). The key: `api_key_file`, else $TRANSFERKIT_API_KEY(_FILE)."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ServingSettings)}
    if unknown:
        raise ConfigError(f"unknown serving settings: {', '.join(sorted(unknown))}")
    if api_key_file is not None:
        overrides["api_key"] = read_api_key_file(api_key_file)
    given = {k: v for k, v in overrides.items() if v is not None}
    if settings is not None:
        return dataclasses.replace(settings, **given)
    env = dict(os.environ)
    if "api_key" in given:
        env.pop(API_KEY_FILE_ENV, None)  # the explicit key wins; an unreadable file it replaces is no error
    return ServingSettings.from_env(env, **given)


def _drain_arg(drain_timeout: float) -> float:
    if not drain_timeout >= 0:
        raise ConfigError(f"--drain-timeout must be >= 0 seconds, got {drain_timeout}")
    return float(drain_timeout)


# ---- process lifecycle (Linux prctl where available; elsewhere the snapshot of descendants still works) ----
def _libc() -> Any:
    with contextlib.suppress(OSError):
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    return None


def become_subreaper() -> bool:
    """Orphaned descendants (workers whose arbiter died) re-parent to this process instead of init."""
    libc = _libc()
    return libc is not None and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


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


def stop_tree(proc: subprocess.Popen, timeout: float, orphans: bool = False,
              hurry: Callable[[], bool] = lambda: False) -> list[int]:  # fmt: skip
    """SIGTERM `proc`, wait until it and every descendant has exited, at most `timeout` s (or until `hurry()`),
    then SIGKILL the rest. -> the pids that had to be killed.

    Descendants are recorded before the signal and while waiting, so a worker re-parented away from the tree
    is still tracked. `orphans`: this process is the subreaper of `proc`'s tree, so all of its own other
    descendants count as well (and are reaped here).
    """

    def scan() -> list[psutil.Process]:
        return [p for p in descendants() if p.pid != proc.pid] if orphans else descendants(proc.pid)

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


def _stop(proc: subprocess.Popen, grace: float = 15.0, group: bool = False) -> None:
    """Stop a `bentoml serve` process and all its workers (SIGTERM, then SIGKILL after `grace` s).
    `group` is accepted for older callers: the workers are found by ancestry, not by process group."""
    stop_tree(proc, grace)


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server binds (circus sets SO_REUSEADDR): TIME_WAIT connections do not count, a listener does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _check_port(host: str, port: int) -> None:
    if not _can_bind(host, port):
        raise TransferkitError(f"cannot listen on {host}:{port} (address in use or not available); pass another --port")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


GRACEFUL_S = 1  # uvicorn's own shutdown, after the workers' drain: only what outlasted the drain is still running


def split_drain(drain_timeout: float) -> tuple[float, int]:
    """`--drain-timeout T` -> (the workers' drain, uvicorn's graceful shutdown). The drain (serving/drain.py)
    answers new requests 503 while accepted ones finish; uvicorn then cancels what is left a second later, and
    workers exit before our deadline, by which `stop_tree` kills what is still running."""
    return max(0.0, drain_timeout - GRACEFUL_S - 0.5), GRACEFUL_S


def _command(host: str, port: int, graceful_s: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--timeout-graceful-shutdown", str(graceful_s)]  # fmt: skip


def _child_env(settings: ServingSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_FILE_ENV, API_KEY_ENV)}
    return {**env, **settings.to_env()}


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 3000, settings: ServingSettings | None = None,
          drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, api_key_file: str | Path | None = None,
          **overrides: Any) -> int:  # fmt: skip
    """Serve in the foreground until SIGTERM/SIGINT/SIGHUP; the server's log streams to this terminal.

    Settings: `settings`, or $TRANSFERKIT_* and `overrides` (ServingSettings fields, e.g. runtime="onnxruntime").
    Returns 0 after a stop by signal; raises TransferkitError when the server exits on its own.
    """
    drain_timeout = _drain_arg(drain_timeout)
    settings = build_settings(settings, api_key_file, **overrides)
    model = resolve_served_model(run_dir, settings.runtime)
    drain_s, graceful_s = split_drain(drain_timeout)
    settings = dataclasses.replace(settings, model=model.tag, runtime=model.runtime, drain_s=drain_s)
    _check_port(host, port)
    print(f"transferkit: serving {model.tag} on http://{host}:{port} (runtime {settings.runtime}, "
          f"{settings.resolved_workers} workers x {settings.resolved_threads} threads, "
          f"api key {'on' if settings.api_key else 'off'}); SIGTERM or Ctrl-C stops", flush=True)  # fmt: skip
    print(f"transferkit: picked {model.because}", flush=True)

    signals: list[int] = []
    # SIGHUP only when not ignored: under `nohup` a closed terminal must not stop the server
    stop_on = [sig for sig in STOP_SIGNALS if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, lambda s, _f: signals.append(s)) for sig in stop_on}
    try:
        become_subreaper()
        proc = subprocess.Popen(_command(host, port, graceful_s), env=_child_env(settings),
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with_parent())  # fmt: skip
        try:
            while not signals and proc.poll() is None:
                time.sleep(0.1)
        except BaseException:  # never leave a server behind, whatever stopped us
            stop_tree(proc, 0.0, orphans=True)
            raise
        if not signals:  # the server stopped by itself: clear up its orphans, then report
            leftovers = stop_tree(proc, 0.0, orphans=True)
            extra = f"; killed {len(leftovers)} leftover processes" if leftovers else ""
            raise TransferkitError(f"the server exited with code {proc.returncode} (its log is above){extra}")
        name = signal.Signals(signals[0]).name
        print(f"transferkit: {name}: finishing in-flight requests (at most {drain_timeout:g}s), then stopping",
              file=sys.stderr, flush=True)  # fmt: skip
        killed = stop_tree(proc, drain_timeout, orphans=True, hurry=lambda: len(signals) > 1)
        if killed:
            print(f"transferkit: killed {len(killed)} server processes still running after the drain "
                  f"(pids {', '.join(map(str, killed))})", file=sys.stderr, flush=True)  # fmt: skip
        end = time.monotonic() + 5.0
        while not _can_bind(host, port) and time.monotonic() < end:
            time.sleep(0.1)
        if not _can_bind(host, port):
            print(f"transferkit: warning: {host}:{port} is still in use by another process", file=sys.stderr)
        print("transferkit: stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- in the background, for tests and scripts ----------------------------------------------------------
@dataclass
class ServerHandle:
    url: str
    tag: str
    process: subprocess.Popen  # the `transferkit serve` process (its own session)
    log_path: Path
    _log: Any = field(repr=False, default=None)
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> list[int]:
        """SIGTERM `transferkit serve` (it drains and stops its server) and wait for it. Processes that had to
        be SIGKILLed as a last resort are returned and warned about (the normal path kills nothing here)."""
        killed = stop_tree(self.process, self.drain_timeout + 15.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        if killed:
            warnings.warn(f"transferkit serve did not stop by itself; killed pids {killed} (log: {self.log_path})",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        return killed

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_command(run_dir: str | Path, host: str, port: int, settings: ServingSettings,
                  drain_timeout: float) -> list[str]:  # fmt: skip
    """The `transferkit serve` command line for these settings (everything but the key, which goes in env)."""
    cmd = [sys.executable, "-m", "transferkit", "serve", str(run_dir), "--host", host, "--port", str(port),
           "--drain-timeout", str(drain_timeout)]  # fmt: skip
    for name, flag in SETTING_FLAGS.items():
        cmd += [flag, str(getattr(settings, name))]
    return cmd


def start_server(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    runtime: str | None = None,
    timeout: float = 120.0,
    log_path: str | Path | None = None,
    *,
    settings: ServingSettings | None = None,
    api_key_file: str | Path | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    **overrides: Any,
) -> ServerHandle:
    """Run `transferkit serve` in the background and wait until /readyz answers 200. port=None: a free port.

    Settings as for `serve` (e.g. workers=1, max_queue=8, api_key_file=...). The output goes to `log_path`
    (default: a temp file); the error on a failed start quotes it.
    """
    import httpx

    drain_timeout = _drain_arg(drain_timeout)
    settings = build_settings(settings, api_key_file, runtime=runtime, **overrides)
    model = resolve_served_model(run_dir, settings.runtime)  # refuse a bad run here, not in the log
    port = free_port(host) if port is None else port
    _check_port(host, port)
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_FILE_ENV, API_KEY_ENV)}
    if settings.api_key:
        env[API_KEY_ENV] = settings.api_key
    # settings `serve` takes no flag for (the middleware switches) reach it the way a container is given them
    unflagged = {f.name for f in dataclasses.fields(settings)} - set(SETTING_FLAGS) - {"model", "api_key", "drain_s"}
    env.update({k: v for k, v in settings.to_env().items() if k.removeprefix(PREFIX).lower() in unflagged})
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="transferkit-serve-", suffix=".log")[1])
    log = open(log_path, "ab")
    proc = subprocess.Popen(serve_command(run_dir, host, port, settings, drain_timeout), env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    handle = ServerHandle(f"http://{host}:{port}", model.tag, proc, log_path, log, drain_timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            handle.stop()
            raise TransferkitError(f"the server exited with code {proc.returncode}:\n{handle.log_tail()}")
        try:
            if httpx.get(f"{handle.url}/readyz", timeout=2.0).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    handle.stop()
    raise TransferkitError(f"the server did not become ready within {timeout:.0f}s:\n{handle.log_tail()}")
