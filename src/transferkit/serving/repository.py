"""The models one worker serves, by name and version, and how a version comes and goes without dropping a request.

    repo = ModelRepository(settings, budget)
    repo.reconcile(sources, control)        # load what is new (beside what serves), swap defaults, retire the rest
    version = repo.pick("digits", None)     # the default version, or one drawn by the model's traffic split
    with version.in_use():
        answer = await version.batcher.submit(pixels)

Every version keeps its own verified artifact (its files checked against their sha256 and those very bytes
loaded), preprocessing, heads, labels and micro-batcher; all batchers share the worker's admission budget.
A new version is loaded and warmed while the old one serves, then the model's entry is replaced in one
assignment: a request picks from one entry, so it never sees half a swap, and one that picked the old version
finishes on it. A retired version leaves the entry at once and is closed once its last request has answered
(or after the drain bound). A version that fails to load or verify never enters the entry; its reason is kept
for the repository index. Loads run in the worker's repository thread (control.py), never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.drift_reference import load_reference
from transferkit.errors import ArtifactMismatchError, TransferkitError
from transferkit.manifest import read_manifest
from transferkit.predictions import rank
from transferkit.preprocess import served_pixel_limit
from transferkit.runtimes.resolve import stored_model_path
from transferkit.runtimes.selection import load_runtime
from transferkit.serving.batcher import MicroBatcher, WorkerBudget, new_runtime_executor
from transferkit.serving.inputs import ClientError
from transferkit.serving.settings import ServingSettings
from transferkit.serving.sources import VersionSource

logger = logging.getLogger("transferkit.serving")
RETIRE_GRACE_S = 0.5
RANKED, LOGITS = "ranked", "logits"  # what a batch answers per head (ServedVersion.run_batch)


def _rss() -> int:
    import psutil  # BentoML's dependency

    return int(psutil.Process().memory_info().rss)


class ServedVersion:
    """One loaded, verified and warmed version of a model in this worker."""

    def __init__(
        self,
        source: VersionSource,
        settings: ServingSettings,
        budget: WorkerBudget,
        on_batch: Callable | None = None,
        locate: Callable[[str], Path | None] = stored_model_path,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        before = _rss()
        self.source = source
        self.name, self.version, self.tag = source.name, source.version, source.tag
        model_dir = locate(source.tag)
        if model_dir is None:
            raise TransferkitError(f"BentoML model {source.tag} is not in the model store; export it again")
        self.export_dir: Path = model_dir
        self.manifest = read_manifest(model_dir)
        self.pre = self.manifest.preprocessing  # never re-derived here
        self.max_pixels = settings.max_pixels or served_pixel_limit(self.pre.image_size)
        self.labels: dict[str, list[str]] = {h: list(c) for h, c in self.manifest.heads.items()}
        self.runtime = load_runtime(
            settings.runtime, model_dir, self.manifest, threads=settings.resolved_threads, check_files=True
        )
        self.runtime_name = self.runtime.description
        self.reference = _drift_reference(model_dir, self.manifest, self.runtime.artifact, source.tag)
        self.batcher = MicroBatcher(
            self.run_batch,
            settings.max_batch,
            settings.max_wait_ms,
            on_batch=on_batch,
            combine=self.combine,
            budget=budget,
            executor=executor,
            on_the_way=lambda: self.in_flight,  # this version's requests, not the other models'
        )
        self.in_flight = 0  # requests that picked this version and are not answered yet (event loop only)
        self.label_tables: dict[str, np.ndarray] = {}  # v2's BYTES outputs, made on first use (v2_routes.py)
        self.answers_counter: Any = None  # its /metrics counter, made on first use (service.py)
        s = self.pre.image_size
        for n in sorted({1, settings.max_batch}):  # first calls at a new batch size allocate: do them now
            self.run_batch(np.zeros((n, s, s, 3), np.uint8))
        self.memory_bytes = max(0, _rss() - before)  # this version's runtime, weights and warm-up buffers

    def run_batch(self, batch: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """uint8 (B,S,S,3) pixels or float32 (B,3,S,S) model input -> per head, (head, RANKED): the (B, C)
        ranked answers, and (head, LOGITS): the logits (copied: a runtime may reuse its output buffers)."""
        x = self.pre.normalize_numpy(batch) if batch.dtype == np.uint8 else batch
        out: dict[tuple[str, str], np.ndarray] = {}
        for head, logits in self.runtime.run(x).items():
            out[head, RANKED] = rank(logits)
            out[head, LOGITS] = np.array(logits, np.float32)
        return out

    def combine(self, parts: list[np.ndarray]) -> np.ndarray:
        """One batch from requests' pixels and preprocessed tensors (v2's FP32 input): normalised together when
        both kinds meet in one batch."""
        if all(p.dtype == parts[0].dtype for p in parts):
            return np.concatenate(parts)
        return np.concatenate([self.pre.normalize_numpy(p) if p.dtype == np.uint8 else p for p in parts])

    @contextlib.contextmanager
    def in_use(self) -> Iterator[ServedVersion]:
        self.in_flight += 1
        try:
            yield self
        finally:
            self.in_flight -= 1

    def close(self, drain_s: float) -> None:
        """After the last request that picked this version has answered (at most `drain_s`): stop its batcher."""
        end = time.monotonic() + drain_s
        # a request that read the old entry just before the swap counts itself in a moment later
        time.sleep(RETIRE_GRACE_S)
        while self.in_flight > 0 and time.monotonic() < end:
            time.sleep(0.05)
        self.batcher.close()


def _drift_reference(model_dir: Path, manifest, artifact: str, tag: str) -> dict[str, np.ndarray] | None:
    """The artifact's stored drift reference (drift_reference.py), or None: an older export has none, and one that
    fails its hash check is not trusted (logged; the version serves, without a drift score)."""
    try:
        return load_reference(model_dir, manifest, manifest.artifacts[artifact])
    except ArtifactMismatchError as exc:
        logger.warning("model %s: drift reference not used: %s", tag, exc)
        return None


@dataclass(frozen=True)
class ModelEntry:
    """What one model serves now. Replaced whole, never changed in place: a request reads one entry."""

    versions: dict[str, ServedVersion]  # loaded, in the order they were listed (oldest first)
    default: str
    split: dict[str, float] = field(default_factory=dict)  # version -> weight; empty: every request to the default

    def pick(self, version: str | None) -> ServedVersion:
        if version:
            found = self.versions.get(version)
            if found is None:
                raise ClientError(404, f"version {version[:100]!r} is not loaded; loaded: {sorted(self.versions)}")
            return found
        if self.split:
            names, weights = zip(*self.split.items())
            return self.versions[random.choices(names, weights)[0]]
        return self.versions[self.default]


@dataclass(frozen=True)
class Control:
    """What the repository API asked for one model (control.py keeps it for every worker)."""

    default: str | None = None  # a version to serve by default (a rollback); None: the newest
    split: dict[str, float] = field(default_factory=dict)
    unloaded: bool = False  # unloaded through the API until it is loaded again
    attempt: int = 0  # raised by each load through the API: versions that failed are tried again


class ModelRepository:
    def __init__(self, settings: ServingSettings, budget: WorkerBudget, on_batch: Callable | None = None) -> None:
        self.settings = settings
        self.budget = budget
        self.on_batch = on_batch
        self.models: dict[str, ModelEntry] = {}  # name -> entry; replaced whole on every change
        self.failed: dict[tuple[str, str], tuple[str, str]] = {}  # (name, version) -> (tag, why it is not served)
        self._attempts: dict[str, int] = {}  # the Control.attempt each model's failures belong to
        self.on_change: Callable[[ModelRepository], None] | None = None  # metrics, after each reconcile
        self.locate: Callable[[str], Path | None] = stored_model_path  # a tag -> its stored model's folder
        # held around each load: the workers of one server load one at a time (control.py); here, no other worker
        self.loading: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        # the worker's one runtime thread, shared by every version's batcher: calls never overlap (batcher.py)
        self.executor = new_runtime_executor()
        self._lock = threading.Lock()  # one reconcile at a time

    # ---- requests (event loop) ---------------------------------------------------------------------------
    def pick(self, name: str | None, version: str | None = None) -> ServedVersion:
        """The version that answers a request for `name` (None: the only model) and `version` (None: the default
        or the split's draw); ClientError 404/400 naming what is served otherwise."""
        models = self.models
        if name is None:
            if len(models) != 1:
                raise ClientError(
                    400 if models else 503,
                    f"this server serves {len(models)} models {sorted(models)}; name one: POST /predict/<model>, "
                    "or the header X-Model",
                )
            name = next(iter(models))
        entry = models.get(name)
        if entry is None:
            raise ClientError(404, f"unknown model {name[:100]!r}; this server serves {sorted(models)}")
        return entry.pick(version)

    def any_version(self) -> ServedVersion | None:
        for entry in self.models.values():
            return entry.versions[entry.default]
        return None

    # ---- changes (the repository thread) -----------------------------------------------------------------
    def reconcile(self, sources: list[VersionSource], control: dict[str, Control]) -> None:
        """Make this worker serve `sources` as `control` says: load new versions beside the serving ones, set
        each model's default and split, retire what is no longer wanted. `self.models` is replaced, never
        changed in place: the event loop reads it while this runs."""
        with self._lock:
            wanted: dict[str, list[VersionSource]] = {}
            for s in sources:
                if not control.get(s.name, Control()).unloaded:
                    wanted.setdefault(s.name, []).append(s)
            for name in [n for n in self.models if n not in wanted]:
                gone = self.models[name]
                self.models = {n: e for n, e in self.models.items() if n != name}
                self._close_after_drain(name, list(gone.versions.values()))
            for name, listed in wanted.items():
                self._reconcile_model(name, listed, control.get(name, Control()))
            if self.on_change is not None:
                self.on_change(self)

    def _reconcile_model(self, name: str, listed: list[VersionSource], control: Control) -> None:
        if self._attempts.get(name, 0) != control.attempt:  # a load asked for again: failed versions get a retry
            self._attempts[name] = control.attempt
            self.failed = {k: v for k, v in self.failed.items() if k[0] != name}
        entry = self.models.get(name)
        loaded = dict(entry.versions) if entry else {}
        retired: list[ServedVersion] = []  # closed once the new entry serves, never before
        pinned = {control.default, *control.split} - {None}
        # the newest versions that can serve (one that failed for these very files does not hold a place)
        servable = [s.version for s in listed if self.failed.get((name, s.version), ("",))[0] != s.tag]
        keep = set(servable[-self.settings.keep_versions :]) | pinned
        for s in listed:
            known = loaded.get(s.version)
            if known is not None and known.tag != s.tag:  # the folder now names another export: reload it
                retired.append(loaded.pop(s.version))
            failed = self.failed.get((name, s.version))
            if s.version in keep and s.version not in loaded and (failed is None or failed[0] != s.tag):
                self._load(s, loaded)
        listed_versions = [s.version for s in listed]
        for version in [v for v in loaded if v not in keep or v not in listed_versions]:
            retired.append(loaded.pop(version))
        if loaded:
            default = control.default if control.default in loaded else None
            if default is None:  # the newest listed version that loaded
                default = next(v for v in reversed(listed_versions) if v in loaded)
            split = {v: w for v, w in control.split.items() if v in loaded} if control.split else {}
            if control.split and len(split) != len(control.split):
                split = {}  # a split over a version that did not load: every request to the default instead
            new = ModelEntry({v: loaded[v] for v in listed_versions if v in loaded}, default, split)
            if entry is None or new != entry:
                self.models = {**self.models, name: new}  # the swap: one assignment
                if entry is None or entry.default != default:
                    logger.info("model %s: version %s serves by default", name, default)
        elif entry is not None:
            self.models = {n: e for n, e in self.models.items() if n != name}
        self._close_after_drain(name, retired)

    def _load(self, source: VersionSource, loaded: dict[str, ServedVersion]) -> None:
        # a version being replaced still counts: the new one loads beside it, so a swap needs room for both
        held = sum(len(e.versions) for n, e in self.models.items() if n != source.name) + len(loaded)
        if held >= self.settings.max_models:
            self.failed[source.name, source.version] = (
                source.tag,
                f"this worker holds {held} model versions, the limit (--max-models {self.settings.max_models}); "
                "unload one first or raise the limit",
            )
            return
        try:
            with self.loading():
                loaded[source.version] = ServedVersion(
                    source, self.settings, self.budget, self.on_batch, self.locate, self.executor
                )
            logger.info("model %s: loaded version %s (%s)", source.name, source.version, source.tag)
        except Exception as exc:  # noqa: BLE001 - any failure: the version is refused with its reason
            reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TransferkitError) else str(exc)
            self.failed[source.name, source.version] = (source.tag, reason)
            logger.warning("model %s: version %s refused: %s", source.name, source.version, reason)

    def _close_after_drain(self, name: str, versions: list[ServedVersion]) -> None:
        """Versions already out of the entry: each closed after its in-flight requests, in a thread."""
        for served in versions:
            threading.Thread(
                target=served.close, args=(self.settings.timeout_s,), name="transferkit-retire", daemon=True
            ).start()
            logger.info("model %s: version %s unloaded (after its requests in flight)", name, served.version)

    # ---- what is served ----------------------------------------------------------------------------------
    def index(self, sources: list[VersionSource]) -> list[dict[str, Any]]:
        """Triton's repository index: every listed version with its state here, and why one is unavailable."""
        rows = []
        for s in sources:
            entry = self.models.get(s.name)
            row: dict[str, Any] = {"name": s.name, "version": s.version}
            if entry is not None and s.version in entry.versions:
                row["state"] = "READY"
                row["default"] = entry.default == s.version
                if entry.split:
                    row["traffic"] = entry.split.get(s.version, 0.0)
            else:
                row["state"] = "UNAVAILABLE"
                failed = self.failed.get((s.name, s.version))
                row["reason"] = failed[1] if failed else "not loaded"
            rows.append(row)
        return rows
