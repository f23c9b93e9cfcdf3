"""Serve exported models over HTTP with BentoML; pick the fastest verified runtime; build a Bento image.

Nothing here imports torch at import time: the serving image has numpy, Pillow, ONNX Runtime and BentoML only.
(`transferkit.serving.service` is the BentoML service module; it is imported by `bentoml serve`, not here.)
"""

from transferkit.manifest import read_manifest
from transferkit.runtimes.runtime import RUNTIME_CHOICES, RUNTIMES, Runtime
from transferkit.runtimes.selection import load_runtime, select_runtime
from transferkit.serving.build import BuildResult, build_bento
from transferkit.serving.client import format_predictions, predict_files
from transferkit.serving.harness import ServerHandle, start_server
from transferkit.serving.server import resolve_served_model, serve

__all__ = [
    "RUNTIMES",
    "RUNTIME_CHOICES",
    "BuildResult",
    "Runtime",
    "ServerHandle",
    "build_bento",
    "format_predictions",
    "load_runtime",
    "predict_files",
    "read_manifest",
    "resolve_served_model",
    "select_runtime",
    "serve",
    "start_server",
]
