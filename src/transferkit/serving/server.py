"""`transferkit serve`: run the BentoML server for an exported run, in the foreground, until a signal.

`serve` checks the run (exported, verified, in the model store, files matching their sha256), then runs
`bentoml serve transferkit.serving.service:TransferkitService` as a child with the ServingSettings in its
environment (settings.py: the only channel to the worker processes, and it keeps the API key out of argv).

The process tree is `transferkit serve` -> `bentoml serve` (circus arbiter) -> one worker per process; how such
a tree is tracked and stopped is processes.py. The lifecycle here:

- the serve process is a child subreaper (Linux), so orphaned workers re-parent to it and stay findable;
- the arbiter runs in its own session (terminal signals reach only us; we decide what it gets) and gets
  SIGTERM when we die, even by SIGKILL (PR_SET_PDEATHSIG);
- SIGTERM/SIGINT/SIGHUP -> SIGTERM to the arbiter, which SIGTERMs the workers; each worker drains (drain.py:
  /readyz 503, new requests 503 with `Connection: close`, accepted ones finish, until quiet or the drain's
  share of `--drain-timeout`), then uvicorn stops accepting and cancels what is left after
  `--timeout-graceful-shutdown` (split_drain; circus itself would wait a day) and exits; whatever is left at
  the drain deadline is SIGKILLed, reaped, and the port is checked free. A second signal skips the rest.

harness.py runs that same CLI (`python -m transferkit serve`) in the background for tests and scripts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError, TransferkitError
from transferkit.options import flags
from transferkit.runtimes.resolve import ServedModel, resolve_served_model, resolve_stored
from transferkit.serving.processes import TREE_ENV, can_bind, check_port, die_with_parent, stop_tree, subreaper
from transferkit.serving.settings import (
    API_KEY_ENV,
    API_KEY_FILE_ENV,
    DEFAULT_DRAIN_TIMEOUT,
    MODEL_ENV,
    ServingSettings,
    api_key_file_in_use,
    read_api_key_file,
)
from transferkit.serving.sources import format_sources, is_repository, run_list, sources_for_paths

__all__ = ["MODEL_ENV", "ServedModel", "resolve_served_model", "serve", "serve_command"]

SERVICE = "transferkit.serving.service:TransferkitService"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# ServingSettings field -> `transferkit serve` option (the model comes from RUN, the key never goes in argv)
SETTING_FLAGS = flags(ServingSettings)


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


def drain_timeout_arg(drain_timeout: float) -> float:
    if not drain_timeout >= 0:
        raise ConfigError(f"--drain-timeout must be >= 0 seconds, got {drain_timeout}")
    return float(drain_timeout)


GRACEFUL_S = 1  # uvicorn's own shutdown, after the workers' drain: only what outlasted the drain is still running


def split_drain(drain_timeout: float) -> tuple[float, int]:
    """`--drain-timeout T` -> (the workers' drain, uvicorn's graceful shutdown). The drain (serving/drain.py)
    answers new requests 503 while accepted ones finish; uvicorn then cancels what is left a second later, and
    workers exit before our deadline, by which `stop_tree` kills what is still running."""
    return max(0.0, drain_timeout - GRACEFUL_S - 0.5), GRACEFUL_S


def _command(host: str, port: int, graceful_s: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--host",
        host,
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        str(graceful_s),
    ]


def _child_env(settings: ServingSettings, marker: str, key_file: str | Path | None) -> dict[str, str]:
    """The server's environment: the settings, and the key as the file it came from where it came from one (the
    workers then follow the file through a rotation, keys.py), else as the value."""
    env = {k: v for k, v in os.environ.items() if k not in (API_KEY_FILE_ENV, API_KEY_ENV)}
    env.update(settings.to_env(), **{TREE_ENV: marker})
    if key_file is not None and settings.api_key:
        env.pop(API_KEY_ENV, None)
        env[API_KEY_FILE_ENV] = str(Path(key_file).resolve())
    return env


def resolve_models(run_dirs: Any, settings: ServingSettings) -> tuple[ServingSettings, list[str]]:
    """What the workers will serve, checked here first (exported, stored, files intact, servable) -> the settings
    that tell them, and a line per version saying what serves it and why. One run: its model, with the artifact
    picked here. Several runs: each a version named by its tag. A repository folder: the workers scan it, and a
    version in it that fails its checks is refused there, without stopping the others."""
    paths = run_list(run_dirs)
    if len(paths) == 1 and not is_repository(paths[0]):
        model = resolve_served_model(paths[0], settings.runtime)
        return dataclasses.replace(settings, model=model.tag, runtime=model.runtime), [model.because]
    sources, folder = sources_for_paths(paths)
    lines, refused = [], 0
    for source in sources:
        try:
            checked = resolve_stored(source.tag, settings.runtime)
            lines.append(f"model {source.name} version {source.version} ({source.tag}): {checked.because}")
        except TransferkitError as exc:
            if folder is None:
                raise
            refused += 1
            lines.append(f"model {source.name} version {source.version}: will be refused: {exc}")
    if folder is not None:
        if refused == len(sources):
            raise TransferkitError(f"{folder}: no version in the repository can be served: " + "; ".join(lines))
        return dataclasses.replace(settings, model="", repository=str(folder.resolve())), lines
    return dataclasses.replace(settings, model=format_sources(sources)), lines


def serve(
    run_dir: str | Path | list[str | Path],
    host: str = "127.0.0.1",
    port: int = 3000,
    settings: ServingSettings | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    api_key_file: str | Path | None = None,
    **overrides: Any,
) -> int:
    """Serve in the foreground until SIGTERM/SIGINT/SIGHUP; the server's log streams to this terminal.
    `run_dir`: an exported run, several, or a model repository folder (sources.py).

    Settings: `settings`, or $TRANSFERKIT_* and `overrides` (ServingSettings fields, e.g. runtime="onnxruntime").
    Returns 0 after a stop by signal; raises TransferkitError when the server exits on its own.
    """
    drain_timeout = drain_timeout_arg(drain_timeout)
    settings = build_settings(settings, api_key_file, **overrides)
    settings, picked = resolve_models(run_dir, settings)
    drain_s, graceful_s = split_drain(drain_timeout)
    state_dir = tempfile.mkdtemp(prefix="transferkit-state-")  # the workers' shared repository state
    settings = dataclasses.replace(settings, drain_s=drain_s, state_dir=state_dir)
    check_port(host, port)
    what = f"repository {settings.repository}" if settings.repository else settings.model.replace(",", ", ")
    print(
        f"transferkit: serving {what} on http://{host}:{port} (runtime {settings.runtime}, "
        f"{settings.resolved_workers} workers x {settings.resolved_threads} threads, "
        f"api key {'on' if settings.api_key else 'off'}); SIGTERM or Ctrl-C stops",
        flush=True,
    )
    for line in picked:
        print(f"transferkit: picked {line}", flush=True)

    signals: list[int] = []
    # SIGHUP only when not ignored: under `nohup` a closed terminal must not stop the server
    stop_on = [sig for sig in STOP_SIGNALS if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN]
    previous = {sig: signal.signal(sig, lambda s, _f: signals.append(s)) for sig in stop_on}
    marker = uuid.uuid4().hex  # this server's processes, told apart from the caller's other children
    try:
        with subreaper():  # the server's orphans come back to us, until it has stopped
            proc = subprocess.Popen(
                _command(host, port, graceful_s),
                env=_child_env(settings, marker, api_key_file or api_key_file_in_use(os.environ)),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
            try:
                while not signals and proc.poll() is None:
                    time.sleep(0.1)
            except BaseException:  # never leave a server behind, whatever stopped us
                stop_tree(proc, 0.0, orphans=marker)
                raise
            if not signals:  # the server stopped by itself: clear up its orphans, then report
                leftovers = stop_tree(proc, 0.0, orphans=marker)
                extra = f"; killed {len(leftovers)} leftover processes" if leftovers else ""
                raise TransferkitError(f"the server exited with code {proc.returncode} (its log is above){extra}")
            name = signal.Signals(signals[0]).name
            print(
                f"transferkit: {name}: finishing in-flight requests (at most {drain_timeout:g}s), then stopping",
                file=sys.stderr,
                flush=True,
            )
            killed = stop_tree(proc, drain_timeout, orphans=marker, hurry=lambda: len(signals) > 1)
            if killed:
                print(
                    f"transferkit: killed {len(killed)} server processes still running after the drain "
                    f"(pids {', '.join(map(str, killed))})",
                    file=sys.stderr,
                    flush=True,
                )
            end = time.monotonic() + 5.0
            while not can_bind(host, port) and time.monotonic() < end:
                time.sleep(0.1)
            if not can_bind(host, port):
                print(f"transferkit: warning: {host}:{port} is still in use by another process", file=sys.stderr)
            print("transferkit: stopped", file=sys.stderr, flush=True)
            return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(state_dir, ignore_errors=True)


def serve_command(
    run_dir: str | Path | list[str | Path], host: str, port: int, settings: ServingSettings, drain_timeout: float
) -> list[str]:
    """The `transferkit serve` command line for these settings (everything but the key, which goes in env)."""
    cmd = [
        sys.executable,
        "-m",
        "transferkit",
        "serve",
        *map(str, run_list(run_dir)),
        "--host",
        host,
        "--port",
        str(port),
        "--drain-timeout",
        str(drain_timeout),
    ]
    for name, flag in SETTING_FLAGS.items():
        value = getattr(settings, name)
        if isinstance(value, bool):  # a switch: --flag or --no-flag
            cmd.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            cmd += [flag, str(value)]
    return cmd
