"""The MLflow tracker: one MLflow run per transferkit run folder, metrics sent in batches off the training thread.

MLflow's HTTP client retries a failed call with backoff for minutes by default; a tracking server that goes away
must not stall training, so metrics go through a queue to a background thread that sends them with `log_batch`
(MLflow's limit: 1,000 metrics a call) every FLUSH_SECONDS, and the retries are bounded unless the user set them.
What could not be sent is counted and said at the end, and never fails the run.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from transferkit.errors import ConfigError
from transferkit.utils import atomic_write_json, read_json

RECORD = "tracking.json"  # RUN/tracking.json: {"mlflow": {"uri": ..., "run_id": ..., "experiment_id": ...}}
FLUSH_SECONDS = 2.0
BATCH = 1000  # MLflow's log_batch limit on metrics per call
PARAMS_BATCH = 100  # and on params per call
EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "transferkit")


def mlflow_client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("--track mlflow:URI needs MLflow's client: pip install 'transferkit[mlflow]'") from None
    # bounded retries: a server that is down fails a call in seconds, not after MLflow's minutes of backoff
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download is noise in logs
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_server(uri: str) -> None:
    client = mlflow_client(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store is the user's to fix
        raise ConfigError(
            f"--track mlflow:{uri}: the tracking server does not answer ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); start it (mlflow server --host 127.0.0.1 ...) or fix the URI"
        ) from None


def code_commit() -> str:
    """The git commit of the transferkit source that ran, when it runs from a checkout ('' otherwise)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


class MlflowTracker:
    def __init__(self, uri: str, run_dir: Path, command: str):
        from mlflow.entities import RunStatus

        self.uri, self.run_dir, self.command = uri, run_dir, command
        self.client = mlflow_client(uri)
        record = self._record().get("mlflow", {})
        if record.get("uri") == uri and record.get("run_id"):
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            self.run_id = self._create_run()
        self.client.set_tag(self.run_id, f"transferkit.{command}", "yes")
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="transferkit-mlflow", daemon=True)
        self._sender.start()

    def _record(self) -> dict:
        path = self.run_dir / RECORD
        return read_json(path) if path.is_file() else {}

    def _create_run(self) -> str:
        from transferkit.version import __version__

        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(EXPERIMENT)
        )
        tags = {
            "mlflow.runName": self.run_dir.resolve().name,
            "mlflow.source.name": "transferkit",
            "mlflow.source.type": "LOCAL",
            "transferkit.run_dir": str(self.run_dir.resolve()),
            "transferkit.version": __version__,
        }
        commit = code_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = self.client.create_run(experiment_id, tags=tags, run_name=self.run_dir.resolve().name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        record = {**self._record(), "mlflow": {"uri": self.uri, "run_id": run.info.run_id}}
        record["mlflow"]["experiment_id"] = experiment_id
        atomic_write_json(self.run_dir / RECORD, record)
        return run.info.run_id

    # ---- what callers log ----
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flat_params(params)
        have = self.client.get_run(self.run_id).data.params
        # MLflow refuses to change a logged param; a resumed run logs the same config, so only new keys go
        items = [Param(k, v[:6000]) for k, v in flat.items() if k not in have]
        for i in range(0, len(items), PARAMS_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queued: the caller (a training step) never waits for the server."""
        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self._queue.put((key, float(value), stamp, step or 0))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, failed: bool = False) -> None:
        self._stop.set()
        self._sender.join(timeout=60)
        self._flush()  # whatever the thread had not taken yet
        if self.dropped:
            print(
                f"transferkit: {self.dropped} metric values could not be sent to MLflow at {self.uri}; the run "
                f"folder has them all (metrics.json)",
                file=sys.stderr,
                flush=True,
            )
        try:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        except Exception as exc:  # noqa: BLE001 - tracking never fails the work it records
            print(f"transferkit: MLflow run {self.run_id} not closed: {exc}", file=sys.stderr, flush=True)

    # ---- the sender ----
    def _send_loop(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self._flush()

    def _flush(self) -> None:
        from mlflow.entities import Metric

        while True:
            batch = []
            while len(batch) < BATCH:
                try:
                    key, value, stamp, step = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(Metric(key, value, stamp, step))
            if not batch:
                return
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception:  # noqa: BLE001 - counted and said at the end; the run folder keeps every value
                self.dropped += len(batch)


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params: dotted keys, lists joined, None as empty."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = "" if value is None else str(value)
    return out
