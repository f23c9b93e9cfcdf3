"""One repository state for every worker of a server, and the thread that keeps each worker at it.

A server's workers are separate processes behind one socket: a repository request (load, unload, a rollback, a
traffic split) reaches one of them. So a request does not change its worker; it writes what it asks for to a
small JSON document that every worker reads (the *control*), under a file lock, with a generation number.
Each worker's repository thread notices a new generation (or, with a repository folder, a changed folder),
reconciles its models to it (repository.py) and reports the generation it reached. The worker that took the
request answers once every live worker has reported it, so the answer means "served everywhere".

    state dir ($TRANSFERKIT_STATE_DIR; `transferkit serve` makes a private one, a container uses
    /tmp/transferkit-state-<the workers' parent pid>):
        control.json        {"generation": n, "models": {name: Control}}
        worker-<pid>.json   {"generation": n}: what that worker serves now
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from transferkit.serving.repository import Control, ModelRepository
from transferkit.serving.sources import VersionSource, scan_repository
from transferkit.utils import atomic_write_text

logger = logging.getLogger("transferkit.serving")
CONTROL_NAME = "control.json"
CONTROL_POLL_S = 0.5  # how often a worker reads the control (a few hundred bytes)


def default_state_dir() -> Path:
    """Shared by the workers of one server without being told: they have the same parent (BentoML's arbiter)."""
    return Path(tempfile.gettempdir()) / f"transferkit-state-{os.getppid()}"


class SharedControl:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.dir / CONTROL_NAME

    def read(self) -> tuple[int, dict[str, Control]]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return 0, {}
        models = {name: Control(**fields) for name, fields in doc.get("models", {}).items()}
        return int(doc.get("generation", 0)), models

    def update(self, name: str, change: Callable[[Control], Control]) -> int:
        """Apply `change` to `name`'s control under the lock every worker takes -> the new generation."""
        with open(self.dir / "control.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            generation, models = self.read()
            models[name] = change(models.get(name, Control()))
            generation += 1
            doc = {"generation": generation, "models": {n: dataclasses.asdict(c) for n, c in models.items()}}
            atomic_write_text(self.path, json.dumps(doc))
            return generation

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """One worker loads at a time: a load (an OpenVINO compile takes half a second of a core at 32 px) in
        every worker at once would take every core from the requests being served; one at a time, the other
        workers serve at full speed meanwhile."""
        with open(self.dir / "load.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def report(self, generation: int) -> None:
        atomic_write_text(self.dir / f"worker-{os.getpid()}.json", json.dumps({"generation": generation}))

    def reached(self, generation: int) -> int:
        """How many live workers serve `generation` (or later)."""
        count = 0
        for path in self.dir.glob("worker-*.json"):
            try:
                pid = int(path.stem.removeprefix("worker-"))
                os.kill(pid, 0)
                count += json.loads(path.read_text()).get("generation", 0) >= generation
            except (ValueError, OSError):
                continue
        return count


class RepositoryWatcher:
    """A worker's repository thread: reconciles at start, then whenever the control or the folder changes."""

    def __init__(
        self,
        repository: ModelRepository,
        control: SharedControl,
        listed: list[VersionSource],
        folder: Path | None,
        poll_s: float,
    ) -> None:
        self.repository = repository
        self.control = control
        self.folder = folder
        self.poll_s = poll_s
        self.sources: list[VersionSource] = list(listed)  # named at start (`serve RUN ...`), or the folder's
        self.skipped: dict[str, str] = {}  # folder entries that are not versions, and why
        self.generation = -1
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def sync(self, scanned: tuple[list[VersionSource], dict[str, str]] | None = None) -> None:
        """Reconcile now, in the calling thread (at worker start, before the worker is ready); `scanned`: the
        folder as just read, else it is read here."""
        generation, controls = self.control.read()
        if self.folder is not None:
            self.sources, self.skipped = scanned or self._scan()
        self.repository.reconcile(self.sources, controls)
        with self._done:
            self.generation = generation
            self._done.notify_all()
        self.control.report(generation)

    def known_names(self) -> set[str]:
        """The models the repository lists now (a folder is read again: a model may have just appeared)."""
        sources = self._scan()[0] if self.folder is not None else self.sources
        return {s.name for s in sources}

    def _scan(self) -> tuple[list[VersionSource], dict[str, str]]:
        try:
            return scan_repository(self.folder)  # type: ignore[arg-type]
        except OSError as exc:  # the folder vanished or is unreadable: keep serving what is loaded
            logger.warning("repository %s: %s; serving what is loaded", self.folder, exc)
            return self.sources, self.skipped

    def start(self) -> None:
        # loads after the start take turns between workers (the first ones ran before any worker was ready)
        self.repository.loading = self.control.loading
        self._thread = threading.Thread(target=self._run, name="transferkit-repository", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def _run(self) -> None:
        last_scan = time.monotonic()
        while not self._stop:
            self._wake.wait(CONTROL_POLL_S)
            self._wake.clear()
            if self._stop:
                return
            try:
                generation, _ = self.control.read()
                changed = generation != self.generation
                scanned = None
                if self.folder is not None and self.poll_s > 0 and time.monotonic() - last_scan >= self.poll_s:
                    last_scan = time.monotonic()
                    scanned = self._scan()
                    changed = changed or scanned != (self.sources, self.skipped)
                if changed:
                    self.sync(scanned)
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad state: logged, retried
                logger.exception("repository reconcile failed; serving what is loaded")

    def wait_for(self, generation: int, workers: int, timeout_s: float) -> bool:
        """Wake this worker's thread and wait until it and `workers` live workers in all serve `generation`."""
        self._wake.set()
        end = time.monotonic() + timeout_s
        with self._done:
            self._done.wait_for(lambda: self.generation >= generation, timeout=timeout_s)
        while time.monotonic() < end:
            if self.control.reached(generation) >= workers:
                return True
            time.sleep(0.05)
        return False
