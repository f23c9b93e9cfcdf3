"""Serving settings: one dataclass, passed from `transferkit serve` to the BentoML workers through the environment.

`bentoml serve` imports the service module in fresh worker processes, so the only channel from the command
line to a worker is the environment. Every knob therefore has one `TRANSFERKIT_*` variable, read here and
nowhere else; `to_env()` writes them and `from_env()` reads them back (a Bento run in a container reads the
same variables, e.g. `docker run -e TRANSFERKIT_API_KEY=...`).

    TRANSFERKIT_MODEL          the versions to serve: BentoML model tags, or `name:version=tag`, comma-separated
                               (required unless TRANSFERKIT_REPOSITORY is set; `transferkit serve`/`build` set it)
    TRANSFERKIT_REPOSITORY     a model repository folder, re-read every TRANSFERKIT_POLL_S seconds (sources.py)
    TRANSFERKIT_MAX_MODELS     model versions one worker holds; TRANSFERKIT_KEEP_VERSIONS: kept per model (2)
    TRANSFERKIT_STATE_DIR      the workers' shared repository state (control.py)
    TRANSFERKIT_RUNTIME        auto | a runtime (onnxruntime, tensorrt, torch, ...) | an artifact (onnx-int8, ...)
    TRANSFERKIT_WORKERS        worker processes (default: from the CPU count and the runtime)
    TRANSFERKIT_THREADS        runtime intra-op threads per worker (default: cores // workers, at least 1)
    TRANSFERKIT_MAX_BATCH      images per runtime call (1 turns batching off)
    TRANSFERKIT_MAX_WAIT_MS    how long the first image of a batch waits for company
    TRANSFERKIT_MAX_QUEUE      images admitted per worker (decoding, queued or running); beyond it: 503
    TRANSFERKIT_MAX_IMAGES     images per request
    TRANSFERKIT_MAX_PIXELS     decoded pixels per image (default: from the model's input size)
    TRANSFERKIT_MAX_INFLIGHT_MB  MB of bodies and decoded images a worker holds at once; beyond: 503 (128)
    TRANSFERKIT_TIMEOUT_S      per-request deadline; past it: 504
    TRANSFERKIT_DRAIN_S        after SIGTERM: at most this long, 503 to new requests while accepted ones finish
    TRANSFERKIT_ACCESS_LOG     1: BentoML's access log line per request (default 0)
    TRANSFERKIT_REQUEST_METRICS  1: BentoML's per-request Prometheus metrics (default 0; transferkit's own stay)
    TRANSFERKIT_TRACING        1: OpenTelemetry spans for /predict (default 0; configure BentoML's exporter)
    TRANSFERKIT_API_KEY        bearer key for /predict and /v2 (or TRANSFERKIT_API_KEY_FILE: a file holding it,
                               re-read when it changes); several keys, one per line or comma, during a rotation
    TRANSFERKIT_METRICS_AUTH   1: /metrics needs the key too (default 0)

ACCESS_LOG, REQUEST_METRICS and TRACING switch BentoML middleware that runs on every request. A py-spy profile of a worker under `hey` load (32 px
demo model, 2 workers, raw PNG bodies, 2-core AVX2 machine) put about 40% of its event-loop CPU in them, the
OpenTelemetry middleware alone about 30% with no exporter configured; with all three off the same server went
from 661 to 1,007 req/s at 64 clients. So they are off unless asked for; each maps onto BentoML's own
configuration keys (service.py), which BENTOML_CONFIG still overrides.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transferkit.artifact import FORMAT_SPECS, MAX_BATCH, RUNTIME_NAMES
from transferkit.errors import ConfigError
from transferkit.machine import cpu_count
from transferkit.options import cli
from transferkit.preprocess import MAX_UPLOAD_BYTES  # one request body (as scoring reads one file)

PREFIX = "TRANSFERKIT_"
MODEL_ENV = PREFIX + "MODEL"
API_KEY_ENV = PREFIX + "API_KEY"
API_KEY_FILE_ENV = PREFIX + "API_KEY_FILE"
DEFAULT_DRAIN_TIMEOUT = 10.0  # seconds in-flight requests may take to finish after SIGTERM (`serve --drain-timeout`)

# The dynamic-batch ceiling compiled into TensorRT/AOTInductor artifacts; serving stays within it.
MAX_BATCH_CEILING = MAX_BATCH
MAX_TOP_K = 100
# Runtimes and formats whose artifacts run on a GPU only (read from the formats table): one worker feeds them
# best. `runtime` may be an artifact name (`tensorrt-fp16`): its format is the part before the first "-".
GPU_RUNTIMES = tuple(s.runtime for s in FORMAT_SPECS.values() if s.devices == ("gpu",))
GPU_NAMES = frozenset(GPU_RUNTIMES) | {s.name for s in FORMAT_SPECS.values() if s.devices == ("gpu",)}


def default_workers(runtime: str, cpus: int | None = None) -> int:
    """One worker per core on CPU runtimes (decoding uploads is per-request Python work that a second process
    parallelises, and batching keeps each worker's model calls large), capped at 4 so memory stays bounded;
    one worker for a GPU engine, which batches best when a single process feeds it."""
    cpus = cpus or cpu_count()
    return 1 if runtime.split("-")[0] in GPU_NAMES else max(1, min(cpus, 4))


@dataclass(frozen=True)
class ServingSettings:
    model: str = ""
    # auto: the fastest verified artifact usable here (by the throughput export measured); a runtime: its best
    # artifact; an artifact name from the export (onnx-int8, ...): exactly that one
    runtime: str = field(default="auto", metadata=cli(metavar="{auto," + ",".join(RUNTIME_NAMES) + "} or ARTIFACT"))
    # worker processes (0: one per core up to 4 on CPU runtimes, one for a GPU runtime)
    workers: int = field(default=0, metadata=cli(metavar="N", default_text="per CPU and runtime"))
    # runtime threads per worker
    threads: int = field(default=0, metadata=cli(metavar="N", default_text="cores / workers"))
    max_batch: int = field(default=32, metadata=cli(metavar="N"))  # images per runtime call (1: no batching)
    max_wait_ms: float = field(default=2.0, metadata=cli(metavar="MS"))  # batching wait for more images
    max_queue: int = field(default=256, metadata=cli(metavar="N"))  # images admitted per worker; beyond: 503
    max_images: int = field(default=32, metadata=cli(metavar="N"))  # images per request; beyond: 413
    # decoded pixels one image may have (0: from the model's input side, preprocess.served_pixel_limit: 4.2 MP
    # up to 128 px, 12.8 MP at 224 px); beyond: 413 before anything is decoded
    max_pixels: int = field(default=0, metadata=cli(metavar="N", default_text="from the model's input size"))
    # MB of request bodies and decoded images one worker holds at once (admission by cost, not by count); beyond: 503
    max_inflight_mb: int = field(default=128, metadata=cli(metavar="MB"))
    timeout_s: float = field(default=10.0, metadata=cli("--timeout", metavar="S"))  # per-request deadline; past it: 504
    drain_s: float = 8.0  # drain.py; the image's bound, which Kubernetes' grace period covers (k8s.py)
    access_log: bool = False
    request_metrics: bool = False
    tracing: bool = False
    # /metrics behind the API key too (Prometheus sends it with `authorization: {credentials_file: ...}`)
    metrics_auth: bool = field(default=False, metadata=cli(default_text="off"))
    api_key: str | None = field(default=None, repr=False)  # one key, or several (one per line or comma) in a rotation
    # a model repository folder re-read every poll_s seconds (`transferkit serve DIR` sets it; sources.py)
    repository: str = ""
    # seconds between reads of the repository folder (0: read at start only; the repository API still works)
    poll_s: float = field(default=2.0, metadata=cli(metavar="S"))
    # model versions one worker holds at most; a load beyond it is refused with the reason
    max_models: int = field(default=8, metadata=cli(metavar="N"))
    # versions of each model kept loaded: the newest, and the one before it for a rollback in one call
    keep_versions: int = field(default=2, metadata=cli(metavar="N"))
    state_dir: str = ""  # the workers' shared repository state (control.py); `serve` makes a private one
    # keep a sample of requests (the model's input pixels and its answers) as Parquet parts in DIR (capture.py)
    capture_dir: str = field(default="", metadata=cli("--capture", metavar="DIR", default_text="off"))
    capture_rate: float = field(default=0.1, metadata=cli(metavar="R"))  # with --capture: share of images kept
    capture_max_mb: int = field(default=1024, metadata=cli(metavar="MB"))  # with --capture: the folder's size

    def __post_init__(self) -> None:
        problems = []
        if self.workers < 0 or self.threads < 0:
            problems.append("workers and threads must be >= 0 (0 picks a default)")
        if not 1 <= self.max_batch <= MAX_BATCH_CEILING:
            problems.append(f"max_batch must be 1..{MAX_BATCH_CEILING}, got {self.max_batch}")
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_images < 1 or self.max_queue < self.max_images:
            problems.append(f"need 1 <= max_images <= max_queue, got {self.max_images} and {self.max_queue}")
        if self.max_inflight_mb * 2**20 < 2 * MAX_UPLOAD_BYTES:
            problems.append(f"max_inflight_mb must be at least {2 * MAX_UPLOAD_BYTES >> 20} (two full uploads)")
        if self.max_pixels < 0:
            problems.append(f"max_pixels must be >= 0 (0: from the model's input size), got {self.max_pixels}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.drain_s >= 0:
            problems.append(f"drain_s must be >= 0, got {self.drain_s}")
        if self.poll_s < 0:
            problems.append(f"poll_s must be >= 0, got {self.poll_s}")
        if self.max_models < 1 or self.keep_versions < 1:
            problems.append(
                f"max_models and keep_versions must be >= 1, got {self.max_models} and {self.keep_versions}"
            )
        if not 0.0 <= self.capture_rate <= 1.0:
            problems.append(f"capture_rate must be 0..1, got {self.capture_rate}")
        if self.capture_max_mb < 1:
            problems.append(f"capture_max_mb must be >= 1, got {self.capture_max_mb}")
        if self.capture_dir:  # the workers may run elsewhere: they get the folder as an absolute path
            object.__setattr__(self, "capture_dir", str(Path(self.capture_dir).expanduser().resolve()))
        if self.api_key is not None and not self.api_key.strip():
            problems.append("the API key is empty")
        if problems:
            raise ConfigError("serving settings: " + "; ".join(problems))

    @property
    def resolved_workers(self) -> int:
        return self.workers or default_workers(self.runtime)

    @property
    def resolved_threads(self) -> int:
        return self.threads or max(1, cpu_count() // self.resolved_workers)

    def to_env(self) -> dict[str, str]:
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[PREFIX + f.name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ServingSettings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls(), f.name)) if f.name != "api_key" else str
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ConfigError(f"${PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        key_file = api_key_file_in_use(env)
        if key_file:
            values["api_key"] = read_api_key_file(key_file)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        """For logs and the startup line: everything but the key."""
        d = asdict(self)
        d["api_key"] = "set" if self.api_key else None
        d["workers"], d["threads"] = self.resolved_workers, self.resolved_threads
        return d


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def api_key_file_in_use(env: Mapping[str, str]) -> str | None:
    """The file the key comes from: $TRANSFERKIT_API_KEY_FILE, unless $TRANSFERKIT_API_KEY gives the key itself."""
    return None if env.get(API_KEY_ENV) else env.get(API_KEY_FILE_ENV) or None


def read_api_key_file(path: str | Path) -> str:
    """The key in PATH (surrounding whitespace and the trailing newline removed), or a clear error."""
    try:
        key = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path} ({exc.strerror}); pass a readable file") from None
    if not key:
        raise ConfigError(f"the API key file {path} is empty; write the key into it")
    return key
