"""manifest.json: the one description of an export that serving trusts (it never re-derives anything).

{
  "manifest_version": 1, "transferkit_version": "0.1.0", "created": "2025-01-01T00:00:00Z",
  "run_dir": "/abs/runs/x", "source": {"file": "model.pt", "sha256": ..., "bytes": ...},
  "backbone": "mobilenet_v2",
  "preprocessing": {"image_size": 64, "mean": [...], "std": [...], "resize": "bilinear", ...},
  "heads": {"digits": ["0", ..., "9"]}, "datasets": {"mnist": "digits"},
  "inputs":  [{"name": "images", "dtype": "float32", "shape": ["batch", 3, 64, 64], "layout": "NCHW"}],
  "outputs": [{"name": "digits", "dtype": "float32", "shape": ["batch", 10]}],
  "formats": {"onnx": {"file": "model.onnx", "runtime": "onnxruntime", "precision": "fp32",
                       "status": "passed", "servable": true, "error": null, "details": {...}}},
  "files": {"model.onnx": {"sha256": ..., "bytes": ...}},
  "versions": {"python": ..., "torch": ..., "onnx": ..., "onnxruntime": ..., "tensorrt": null, "bentoml": ...},
  "bentoml": {"tag": "transferkit-x:version"} | null
}
A TensorRT entry's details also name the GPU it was built for ("built_for_gpu").
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import transferkit
from transferkit.artifact import INPUT_NAME
from transferkit.serving.manifest import MANIFEST_NAME, MANIFEST_VERSION, VERIFY_NAME, read_manifest, servable_formats
from transferkit.utils import atomic_write_json, sha256_file

if TYPE_CHECKING:
    from transferkit.runs import Run

__all__ = [
    "MANIFEST_NAME", "MANIFEST_VERSION", "VERIFY_NAME", "base_manifest", "file_entry", "package_versions",
    "read_manifest", "servable_formats", "write_manifest",
]  # fmt: skip

_VERSIONED = ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "openvino",
              "nncf", "bentoml")  # fmt: skip


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def package_versions() -> dict[str, str | None]:
    """Installed versions (None when absent), read from package metadata: nothing is imported."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def base_manifest(run: "Run", head_names: list[str]) -> dict[str, Any]:
    """Everything except per-format results: what the model is and what goes in and out of it."""
    size = run.preprocessing.image_size
    return {
        "manifest_version": MANIFEST_VERSION,
        "transferkit_version": transferkit.__version__,
        "created": now_utc(),
        "run_dir": str(Path(run.dir).resolve()),
        "source": {"file": run.model_path.name, **file_entry(run.model_path)},
        "backbone": run.config.backbone,
        "preprocessing": run.preprocessing.to_dict(),
        "heads": {h: list(run.labels.heads[h]) for h in head_names},
        "datasets": dict(run.labels.datasets),
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, size, size], "layout": "NCHW"}],
        "outputs": [
            {"name": h, "dtype": "float32", "shape": ["batch", len(run.labels.heads[h])]} for h in head_names
        ],
        "formats": {},
        "files": {},
        "versions": package_versions(),
        "bentoml": None,
    }


def write_manifest(export_dir: Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_json(Path(export_dir) / MANIFEST_NAME, manifest)
