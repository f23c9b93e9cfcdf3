"""A `transferkit serve` in the background, for tests, benchmarks and scripts: `start_server` runs the same CLI
a user runs (`python -m transferkit serve`), waits until /readyz answers 200 and hands back a ServerHandle,
which stops the whole process tree on exit.

    with start_server("runs/demo", workers=1) as server:
        httpx.post(server.url + "/predict", content=png, headers={"Content-Type": "image/png"})
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.serving.processes import check_port, die_with_parent, free_port, stop_tree
from transferkit.serving.server import (
    DEFAULT_DRAIN_TIMEOUT,
    SETTING_FLAGS,
    build_settings,
    drain_timeout_arg,
    resolve_models,
    serve_command,
)
from transferkit.serving.settings import API_KEY_ENV, API_KEY_FILE_ENV, PREFIX, ServingSettings


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
            warnings.warn(
                f"transferkit serve did not stop by itself; killed pids {killed} (log: {self.log_path})",
                RuntimeWarning,
                stacklevel=2,
            )
        return killed

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    run_dir: str | Path | list[str | Path],
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

    drain_timeout = drain_timeout_arg(drain_timeout)
    settings = build_settings(settings, api_key_file, runtime=runtime, **overrides)
    checked, _ = resolve_models(run_dir, settings)  # refuse a bad run here, not in the log
    first = checked.model.split(",")[0]
    tag = first.partition("=")[2] or first  # the first listed version's stored model ("" for a folder)
    port = free_port(host) if port is None else port
    check_port(host, port)
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_FILE_ENV, API_KEY_ENV)}
    if api_key_file is not None:  # the serve process reads it and hands the workers the file, to follow (keys.py)
        env[API_KEY_FILE_ENV] = str(Path(api_key_file).resolve())
    elif settings.api_key:
        env[API_KEY_ENV] = settings.api_key
    # settings `serve` takes no flag for (the middleware switches) reach it the way a container is given them
    unflagged = (
        {f.name for f in dataclasses.fields(settings)}
        - set(SETTING_FLAGS)
        - {"model", "api_key", "drain_s", "repository", "state_dir"}
    )
    env.update({k: v for k, v in settings.to_env().items() if k.removeprefix(PREFIX).lower() in unflagged})
    log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="transferkit-serve-", suffix=".log")[1])
    log = open(log_path, "ab")
    # its own session (a Ctrl-C meant for the caller reaches it only through the handle), and SIGTERM, a
    # graceful stop, when the caller dies without stopping it (a killed test run leaves no server behind)
    proc = subprocess.Popen(
        serve_command(run_dir, host, port, settings, drain_timeout),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    handle = ServerHandle(f"http://{host}:{port}", tag, proc, log_path, log, drain_timeout)
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
