"""manifest.json: the typed contract between export (which writes it) and serving, `benchmark` and `build` (which
trust it and never re-derive anything). Torch-free: it ships in the lean serving image.

    manifest = read_manifest(RUN / "export")          # -> Manifest (a version-1 file is migrated on read)
    entry = manifest.artifacts["onnx-int8"]           # -> ArtifactEntry: format, precision, files, status, ...
    manifest.servable()                                # artifacts that passed verify, in export order
    manifest.stored()                                  # what the BentoML model holds: servable artifacts only
    write_manifest(RUN / "export", manifest)           # atomic

On disk (version 2):
{
  "manifest_version": 2, "transferkit_version": "0.1.0", "created": "2026-01-01T00:00:00Z",
  "run_dir": "/abs/runs/x", "source": {"file": "model.pt", "sha256": ..., "bytes": ...}, "backbone": "mobilenet_v2",
  "preprocessing": {"image_size": 64, "mean": [...], ...}, "heads": {"digits": ["0", ...]}, "datasets": {"mnist": "digits"},
  "inputs":  [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 64, 64], "layout": "NCHW"}],
  "outputs": [{"name": "digits", "dtype": "float32", "shape": ["batch", 10]}],
  "formats": {"onnx-int8": {"format": "onnx", "precision": "int8", "runtime": "onnxruntime",
                            "files": ["model-int8.onnx"], "file": "model-int8.onnx", "status": "passed",
                            "servable": true, "error": null,
                            "batch_range": [1, 64] | null,          # compiled batch range (TensorRT, AOTInductor)
                            "device": "cpu" | "cuda" | null,        # compiled for (AOTInductor)
                            "built_for_gpu": "NVIDIA H200" | null,  # TensorRT engines run on that GPU only
                            "runtime_options": {"performance_hint": "THROUGHPUT", "infer_requests": 2},
                            "measured": [{"images_per_second": ..., "batch": 32, "device": "cpu", "machine": {...},
                                          "load": 0.1, "by": "export", ...}],
                            "details": {...},                       # the exporter's own record, not read by serving
                            "reference": "reference-onnx-int8.npz" | null}},  # drift_reference.py
  "files": {"model-int8.onnx": {"sha256": ..., "bytes": ...}},
  "versions": {"python": ..., "torch": ..., ...}, "bentoml": {"tag": "transferkit-x:v", "model_name": ...} | null
}
"file" and "servable" are written for people and tools reading the JSON; they are derived again on read.
Version 1 kept the serving fields inside "details" (profile.max_batch, batch_range, device, built_for_gpu) and one
"measured" object with no machine; `_migrate_v1` moves them, and its measurements, lacking a machine, are not
trusted by `--runtime auto` on any machine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.artifact import INPUT_NAME, MAX_BATCH, PASSED
from transferkit.errors import ArtifactMismatchError, TransferkitError
from transferkit.machine import Machine
from transferkit.preprocess import Preprocessing
from transferkit.utils import atomic_write_json, read_json, sha256_file

if TYPE_CHECKING:
    from transferkit.runs import Run

MANIFEST_VERSION = 2
MANIFEST_NAME = "manifest.json"
VERIFY_NAME = "verify.json"
_VERSIONED = (
    "torch",
    "torchvision",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "openvino",
    "nncf",
    "bentoml",
)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Any, ...]  # "batch" for the dynamic batch dimension
    layout: str | None = None


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime should run the artifact, chosen at export by measuring (OpenVINO: the performance hint
    and the number of infer requests one call's batch is split across)."""

    performance_hint: str | None = None
    infer_requests: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Measurement:
    """Images/s of one artifact at one batch size, on one machine, with the load it was measured under."""

    images_per_second: float
    batch: int
    device: str  # "cpu" | "gpu": where the runtime ran it
    runtime: str  # the runtime's description (engine, provider)
    machine: Machine | None  # None: a version-1 measurement (machine unknown)
    load: float | None = None  # 1-minute load average when measured
    by: str = "export"  # export | benchmark
    created: str = ""
    runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["machine"] = self.machine.to_dict() if self.machine else None
        d["runtime_options"] = self.runtime_options.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        machine = Machine.from_dict(d["machine"]) if d.get("machine") else None
        return cls(
            float(d["images_per_second"]),
            int(d.get("batch", 32)),
            str(d.get("device", "cpu")),
            str(d.get("runtime", "")),
            machine,
            d.get("load"),
            str(d.get("by", "export")),
            str(d.get("created", "")),
            RuntimeOptions(**(d.get("runtime_options") or {})),
        )


@dataclass(frozen=True)
class ArtifactEntry:
    """One artifact: a format at a precision, its files, whether it passed verify, and what serving needs."""

    name: str  # the manifest key and `--runtime` name: onnx, onnx-int8, openvino-int8, ...
    format: str
    precision: str
    runtime: str
    files: tuple[str, ...]  # main file first (OpenVINO: .xml, then .bin)
    status: str  # one of transferkit.artifact.STATUSES
    error: str | None = None
    batch_range: tuple[int, int] | None = None
    device: str | None = None
    built_for_gpu: str | None = None
    runtime_options: RuntimeOptions = field(default_factory=RuntimeOptions)
    measured: tuple[Measurement, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    # the artifact's own softmax outputs on the gate's held-out images (drift_reference.py)
    reference: str | None = None

    @property
    def servable(self) -> bool:
        return self.status == PASSED

    @property
    def file(self) -> str:
        return self.files[0]

    @property
    def all_files(self) -> tuple[str, ...]:
        """What travels with the artifact (stored, registered, carried over): its files and its reference."""
        return self.files + ((self.reference,) if self.reference else ())

    @property
    def max_batch(self) -> int:
        return self.batch_range[1] if self.batch_range else MAX_BATCH

    def speed_on(self, machine: Machine, device: str) -> Measurement | None:
        """The newest measurement taken on a machine like `machine`, on `device`; None if there is none."""
        here = [m for m in self.measured if m.device == device and (device == "gpu" or machine.same_kind(m.machine))]
        return here[-1] if here else None

    def with_measurement(self, m: Measurement) -> ArtifactEntry:
        """This entry with `m` replacing any earlier measurement on the same kind of machine and device."""
        kept = tuple(
            o for o in self.measured if not (o.device == m.device and m.machine and m.machine.same_kind(o.machine))
        )
        return dataclasses.replace(self, measured=(*kept, m))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "precision": self.precision,
            "runtime": self.runtime,
            "files": list(self.files),
            "file": self.file,
            "status": self.status,
            "servable": self.servable,
            "error": self.error,
            "batch_range": list(self.batch_range) if self.batch_range else None,
            "device": self.device,
            "built_for_gpu": self.built_for_gpu,
            "runtime_options": self.runtime_options.to_dict(),
            "measured": [m.to_dict() for m in self.measured],
            "details": self.details,
            "reference": self.reference,
        }

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> ArtifactEntry:
        batch_range = tuple(d["batch_range"]) if d.get("batch_range") else None
        return cls(
            name,
            d["format"],
            d["precision"],
            d["runtime"],
            tuple(_bare(f) for f in d["files"]),
            d["status"],
            d.get("error"),
            batch_range,
            d.get("device"),
            d.get("built_for_gpu"),  # type: ignore[arg-type]
            RuntimeOptions(**(d.get("runtime_options") or {})),
            tuple(Measurement.from_dict(m) for m in d.get("measured") or ()),
            dict(d.get("details") or {}),
            _bare(d["reference"]) if d.get("reference") else None,
        )


@dataclass(frozen=True)
class Manifest:
    transferkit_version: str
    created: str
    run_dir: str
    source: dict[str, Any]  # {"file": "model.pt", "sha256": ..., "bytes": ...}
    backbone: str
    preprocessing: Preprocessing  # contract 1, serialised by its own to_dict/from_dict
    heads: dict[str, tuple[str, ...]]  # head -> class names, in logit order
    datasets: dict[str, str]  # dataset -> head
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # one per head, in head order
    artifacts: dict[str, ArtifactEntry] = field(default_factory=dict)  # in the order they were built
    files: dict[str, FileRecord] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=dict)
    bentoml: dict[str, str] | None = None  # {"tag": ..., "model_name": ...} once saved to the model store

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def head_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def tag(self) -> str | None:
        return (self.bentoml or {}).get("tag")

    def servable(self) -> list[str]:
        """Artifacts that passed verify against PyTorch: the only ones serving may load."""
        return [name for name, e in self.artifacts.items() if e.servable]

    def with_artifact(self, entry: ArtifactEntry, records: dict[str, FileRecord | None] | None = None) -> Manifest:
        """This manifest with `entry` replacing the artifact of its name; `records` (file -> record, None to
        forget the file) update the file list."""
        files = dict(self.files)
        for name, record in (records or {}).items():
            if record is None:
                files.pop(name, None)
            else:
                files[name] = record
        return dataclasses.replace(self, artifacts={**self.artifacts, entry.name: entry}, files=files)

    def stored(self) -> Manifest:
        """What a BentoML model of this export holds: the servable artifacts and their files, nothing else, so
        every file the stored manifest lists is there to check and load."""
        keep = {n: e for n, e in self.artifacts.items() if e.servable}
        names = {f for e in keep.values() for f in e.all_files}
        return dataclasses.replace(self, artifacts=keep, files={f: r for f, r in self.files.items() if f in names})

    def check_files(self, export_dir: str | Path, names: Iterable[str] | None = None) -> None:
        """Check files against the sizes and sha256 recorded here, before any is loaded (`names`: only those).
        Raises ArtifactMismatchError for a missing, truncated, corrupt or replaced file, or one with no record."""
        export_dir = Path(export_dir)
        for name in self.files if names is None else names:
            record, path = self._record_for(export_dir, name), export_dir / name
            if not path.is_file():
                raise ArtifactMismatchError(
                    f"{path}: missing, but {MANIFEST_NAME} lists it (expected sha256 {record.sha256}); "
                    f"{self._fix(export_dir)}"
                )
            size = path.stat().st_size  # size first: a truncated file is reported as such without hashing
            self._compare(path, record, size, lambda p=path: sha256_file(p), export_dir)

    def read_verified(self, export_dir: str | Path, names: Iterable[str]) -> dict[str, bytes]:
        """Each file read once into memory and checked against its recorded size and sha256 -> name: bytes. A
        runtime given these bytes runs exactly what was checked: no window in which the file could be swapped
        between the check and the load. Raises ArtifactMismatchError as check_files does."""
        export_dir, out = Path(export_dir), {}
        for name in names:
            record, path = self._record_for(export_dir, name), export_dir / name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ArtifactMismatchError(
                    f"{path}: cannot be read ({exc.strerror}); {self._fix(export_dir)}"
                ) from None
            self._compare(path, record, len(data), lambda d=data: hashlib.sha256(d).hexdigest(), export_dir)
            out[name] = data
        return out

    def _fix(self, export_dir: Path) -> str:
        return f"re-run `transferkit export {self.run_dir or export_dir.parent}`"

    def _record_for(self, export_dir: Path, name: str) -> FileRecord:
        record = self.files.get(name)
        if record is None:  # an artifact file with no hash would be loaded unchecked
            raise ArtifactMismatchError(
                f"{export_dir / name}: {MANIFEST_NAME} lists no sha256 for it, so it cannot be checked; "
                f"{self._fix(export_dir)}"
            )
        return record

    def _compare(self, path: Path, record: FileRecord, size: int, digest, export_dir: Path) -> None:
        if size != record.bytes:
            raise ArtifactMismatchError(
                f"{path}: size mismatch: expected {record.bytes} bytes ({MANIFEST_NAME}), actual {size}; "
                f"expected sha256 {record.sha256}, actual {digest()}; the file is truncated or was "
                f"replaced; {self._fix(export_dir)}"
            )
        actual = digest()
        if actual != record.sha256:
            raise ArtifactMismatchError(
                f"{path}: sha256 mismatch: expected {record.sha256} ({MANIFEST_NAME}), "
                f"actual {actual}; the file is corrupt or was replaced; {self._fix(export_dir)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": MANIFEST_VERSION,
            "transferkit_version": self.transferkit_version,
            "created": self.created,
            "run_dir": self.run_dir,
            "source": self.source,
            "backbone": self.backbone,
            "preprocessing": self.preprocessing.to_dict(),
            "heads": {h: list(c) for h, c in self.heads.items()},
            "datasets": self.datasets,
            "inputs": [_tensor_dict(t) for t in self.inputs],
            "outputs": [_tensor_dict(t) for t in self.outputs],
            "formats": {n: e.to_dict() for n, e in self.artifacts.items()},
            "files": {n: dataclasses.asdict(r) for n, r in self.files.items()},
            "versions": self.versions,
            "bentoml": self.bentoml,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("manifest_version")
        if version == 1:
            d = _migrate_v1(d)
        elif version != MANIFEST_VERSION:
            raise TransferkitError(
                f"manifest_version {version}: this transferkit reads versions 1 and "
                f"{MANIFEST_VERSION}; re-run the export"
            )
        return cls(
            d["transferkit_version"],
            d["created"],
            d["run_dir"],
            dict(d["source"]),
            d["backbone"],
            Preprocessing.from_dict(d["preprocessing"]),
            {h: tuple(c) for h, c in d["heads"].items()},
            dict(d["datasets"]),
            tuple(_tensor(t) for t in d["inputs"]),
            tuple(_tensor(t) for t in d["outputs"]),
            {n: ArtifactEntry.from_dict(n, e) for n, e in d.get("formats", {}).items()},
            {_bare(n): FileRecord(r["sha256"], int(r["bytes"])) for n, r in (d.get("files") or {}).items()},
            dict(d.get("versions") or {}),
            d.get("bentoml"),
        )


def _bare(name: str) -> str:
    """A file name from a manifest, which is joined to the export folder: a bare name, never a path that could
    lead out of it (`../model.pt`, `/etc/passwd`)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"file name {name!r} is not a bare file name")
    return name


def _tensor_dict(t: TensorSpec) -> dict[str, Any]:
    d = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
    return d | ({"layout": t.layout} if t.layout else {})


def _tensor(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]), d.get("layout"))


def _migrate_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: serving fields out of "details", one machine-less "measured" object -> a list."""
    formats = {}
    for name, e in (d.get("formats") or {}).items():
        details = dict(e.get("details") or {})
        fmt = e.get("format") or name  # the first version-1 manifests keyed entries by format and named no format
        profile = details.get("profile") or {}
        batch_range = details.get("batch_range") or (
            [profile.get("min_batch", 1), profile["max_batch"]] if "max_batch" in profile else None
        )
        gpu = details.get("built_for_gpu") or {}
        measured = e.get("measured")
        formats[name] = {
            "format": fmt,
            "precision": e.get("precision", "fp32"),
            "runtime": e.get("runtime", ""),
            "files": list(e.get("files") or [e["file"]]),
            "status": e["status"],
            "error": e.get("error"),
            "batch_range": batch_range,
            "device": details.get("device"),
            "built_for_gpu": gpu.get("name") if isinstance(gpu, dict) else gpu,
            "runtime_options": {},
            "measured": [{**measured, "machine": None}] if measured else [],
            "details": details,
        }
    return {**d, "manifest_version": MANIFEST_VERSION, "formats": formats}


def read_manifest(export_dir: str | Path) -> Manifest:
    """EXPORT_DIR/manifest.json, or an error that says how to make it."""
    path = Path(export_dir) / MANIFEST_NAME
    run_dir = Path(export_dir).parent
    if not run_dir.is_dir():
        raise TransferkitError(f"{run_dir}: no such folder; pass the run folder `transferkit train` printed")
    if not (run_dir / "config.yaml").is_file() and not path.is_file():
        raise TransferkitError(
            f"{run_dir} is not a transferkit run folder (it has no config.yaml); pass the run "
            "folder `transferkit train` printed"
        )
    if not path.is_file():
        raise TransferkitError(
            f"{path} not found: the run has not been exported; run `transferkit export {Path(export_dir).parent}`"
        )
    try:
        return Manifest.from_dict(read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise TransferkitError(f"{path} is malformed ({type(exc).__name__}: {exc}); re-run the export") from None


def write_manifest(export_dir: str | Path, manifest: Manifest) -> Path:
    return atomic_write_json(Path(export_dir) / MANIFEST_NAME, manifest.to_dict())


def package_versions() -> dict[str, str | None]:
    """Installed versions (None when absent), read from package metadata: nothing is imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_manifest(run: Run, head_names: list[str]) -> Manifest:
    """Everything except the artifacts: what the model is and what goes in and out of it."""
    from transferkit.version import __version__

    size = run.preprocessing.image_size
    return Manifest(
        transferkit_version=__version__,
        created=now_utc(),
        run_dir=str(Path(run.dir).resolve()),
        source={"file": run.model_path.name, **dataclasses.asdict(FileRecord.of(run.model_path))},
        backbone=run.config.backbone,
        preprocessing=run.preprocessing,
        heads={h: tuple(run.labels.heads[h]) for h in head_names},
        datasets=dict(run.labels.datasets),
        inputs=(TensorSpec(INPUT_NAME, "float32", ("batch", 3, size, size), "NCHW"),),
        outputs=tuple(TensorSpec(h, "float32", ("batch", len(run.labels.heads[h]))) for h in head_names),
        versions=package_versions(),
    )
