"""Experiment tracking: a run's config, metrics, reports and exports sent to where a team keeps its runs.

    tracker = open_tracker("mlflow:http://127.0.0.1:5000", run_dir, "train")   # NullTracker for None
    tracker.log_params(config.to_dict()); tracker.log_metrics({"val_acc": 0.9}, step=1); tracker.finish()

One transferkit run folder is one tracked run: `train` (or `distill`) creates it and records its id in
RUN/tracking.json, and `eval`, `export` and a resumed `train` add to the same run. Only MLflow is built in
(`mlflow:URI`, the `[mlflow]` extra); TensorBoard stays the run folder's own `--tensorboard`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from transferkit.errors import ConfigError

SCHEMES = ("mlflow",)


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, failed: bool = False) -> None: ...


class NullTracker:
    """No tracking: every call does nothing, so callers need no `if tracker` around each one."""

    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


def parse_track(text: str) -> tuple[str, str]:
    """`mlflow:URI` -> ("mlflow", URI). URI: an http(s) tracking server, a `sqlite:///` file, or a folder."""
    scheme, sep, uri = text.partition(":")
    if not sep or scheme not in SCHEMES or not uri:
        raise ConfigError(
            f"--track {text!r}: use mlflow:URI, e.g. mlflow:http://127.0.0.1:5000 or mlflow:sqlite:///mlflow.db"
        )
    return scheme, uri


def check_track(text: str | None) -> None:
    """Refuse a bad --track before training: the scheme, the client library, and the server answering."""
    if not text:
        return
    _, uri = parse_track(text)
    from transferkit.tracking.mlflow_tracker import check_server

    check_server(uri)


def open_tracker(text: str | None, run_dir: Path, command: str) -> Tracker | NullTracker:
    if not text:
        return NullTracker()
    _, uri = parse_track(text)
    from transferkit.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker(uri, Path(run_dir), command)
