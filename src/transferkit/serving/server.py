"""Start the BentoML service for an exported run: in the foreground (`serve`) or in the background (`start_server`).

Both read RUN/export/manifest.json for the model tag that `export_run` stored, refuse a run that has not been
exported or has no verified format, and then run `bentoml serve transferkit.serving.service:TransferkitService`
as a child process with $TRANSFERKIT_MODEL and $TRANSFERKIT_RUNTIME set.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.serving.manifest import read_manifest, servable_formats
from transferkit.serving.runtime import select_runtime

SERVICE = "transferkit.serving.service:TransferkitService"
MODEL_ENV = "TRANSFERKIT_MODEL"  # same names as in service.py (not imported: that module needs the env set)
RUNTIME_ENV = "TRANSFERKIT_RUNTIME"


@dataclass
class ServedModel:
    tag: str
    export_dir: Path  # RUN/export
    model_dir: Path  # the stored model in $BENTOML_HOME/models
    manifest: dict[str, Any]


def stored_model_path(tag: str) -> Path | None:
    """The directory of a stored BentoML model, or None when the store ($BENTOML_HOME) has no such tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(tag).path)
    except NotFound:
        return None


def resolve_served_model(run_dir: str | Path, runtime: str = "auto") -> ServedModel:
    """The run's stored model, checked: exported, verified, in the model store, servable by `runtime` here."""
    export_dir = Path(run_dir) / "export"
    manifest = read_manifest(export_dir)
    if not servable_formats(manifest):
        statuses = ", ".join(f"{k}: {v['status']}" for k, v in manifest["formats"].items()) or "none"
        raise TransferkitError(
            f"{run_dir}: no exported format passed verification ({statuses}); see {export_dir / 'verify.json'}"
        )
    tag = (manifest.get("bentoml") or {}).get("tag")
    if not tag:
        raise TransferkitError(f"{run_dir}: the export was not saved to the BentoML model store; re-run the export")
    model_dir = stored_model_path(tag)
    if model_dir is None:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise TransferkitError(
            f"BentoML model {tag} is not in the model store at {home}; re-run `transferkit export {run_dir}` "
            "(or set BENTOML_HOME to the store it was exported to)"
        )
    stored_manifest = read_manifest(model_dir)
    select_runtime(runtime, stored_manifest, model_dir)  # fail here, with the reason, not in the child
    return ServedModel(tag, export_dir, model_dir, stored_manifest)


def _command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]


def _env(tag: str, runtime: str) -> dict[str, str]:
    return {**os.environ, MODEL_ENV: tag, RUNTIME_ENV: runtime}


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TransferkitError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 3000, runtime: str = "auto") -> int:
    """Serve in the foreground; the server's log streams to this terminal; Ctrl-C stops it. -> exit code."""
    model = resolve_served_model(run_dir, runtime)
    _check_port(host, port)
    print(f"serving {model.tag} from {model.model_dir} on http://{host}:{port} (runtime {runtime}); Ctrl-C stops",
          flush=True)  # fmt: skip
    proc = subprocess.Popen(_command(host, port), env=_env(model.tag, runtime))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        return 0


@dataclass
class ServerHandle:
    url: str
    tag: str
    process: subprocess.Popen
    log_path: Path
    _log: Any = field(repr=False, default=None)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        _stop(self.process, group=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    runtime: str = "auto",
    timeout: float = 120.0,
    log_path: str | Path | None = None,
) -> ServerHandle:
    """Start the server in the background and wait until /readyz answers 200. port=None picks a free port.

    The server's output goes to `log_path` (default: a temp file); the error on a failed start quotes it.
    """
    import httpx

    model = resolve_served_model(run_dir, runtime)
    port = free_port(host) if port is None else port
    _check_port(host, port)
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="transferkit-serve-", suffix=".log")[1])
    log = open(log_path, "ab")
    proc = subprocess.Popen(_command(host, port), env=_env(model.tag, runtime), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    handle = ServerHandle(f"http://{host}:{port}", model.tag, proc, log_path, log)
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


def _stop(proc: subprocess.Popen, grace: float = 15.0, group: bool = False) -> None:
    """SIGINT (BentoML's graceful shutdown), then SIGTERM, then SIGKILL; to the whole group when `group`
    (start_server puts the server and its workers in their own process group)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    if group:  # a worker that outlived the server process
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
