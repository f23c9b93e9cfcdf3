"""Which runtime serves an export here: `--runtime auto`, a runtime name or an artifact name -> a loaded Runtime.

`--runtime` takes `auto`, a runtime name (the best of its artifacts) or an artifact name (exactly that one).
"Best" is, among servable artifacts that can run here: those that run on a GPU here first; then the fastest by
the throughput measured on a machine like this one (same CPU model, instruction sets and cores: export and
`transferkit benchmark` record each figure with its machine, transferkit.machine); artifacts without such a
measurement after those, by the row's `auto_rank` (tensorrt > onnxruntime-gpu > torch on CUDA > onnxruntime on
CPU > torch on CPU > openvino). The chosen runtime's `selected_because` says which numbers decided, and the server
logs it. Never an artifact whose verification failed, and never a precision the row serves
on GPU only (fp16 ONNX) on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from transferkit.artifact import FORMAT_SPECS, spec_for_runtime
from transferkit.errors import ConfigError, TransferkitError
from transferkit.machine import Machine
from transferkit.manifest import ArtifactEntry, Manifest
from transferkit.runtimes.runtime import RUNTIME_CHOICES, RUNTIMES, Runtime, runner_for


def artifact_problem(name: str, manifest: Manifest, export_dir: str | Path | None = None) -> str | None:
    """Why the artifact `name` cannot be served here (None when it can)."""
    entry = manifest.artifacts.get(name)
    if entry is None:
        fmt, _, precision = name.partition("-")
        hint = f" --precision {precision}" if precision else ""
        return f"the export has no {name} artifact (transferkit export RUN --format {fmt}{hint})"
    if not entry.servable:
        return f"the {name} artifact is not servable: {entry.status} (see verify.json)"
    if export_dir is not None:
        missing = [f for f in entry.files if not (Path(export_dir) / f).is_file()]
        if missing:
            return f"{Path(export_dir) / missing[0]} is missing"
    cls = runner_for(entry)
    problem = cls.unavailable_reason(entry)
    if problem is None and entry.precision in FORMAT_SPECS[cls.format].gpu_only_precisions:
        if cls.device_kind(entry) != "gpu":
            problem = f"{entry.precision} {cls.format} is served on a GPU only (on this CPU it is slower than fp32)"
    return problem


def measured_throughput(entry: ArtifactEntry, device: str, machine: Machine | None = None) -> float | None:
    """Images/s measured for this artifact on `device` ("cpu"/"gpu") on a machine like `machine` (default: this
    one); None when it was not measured on such a machine (a number from another CPU says nothing here)."""
    m = entry.speed_on(machine or Machine.this(), device)
    return m.images_per_second if m and m.images_per_second > 0 else None


def preference_order(names: list[str], manifest: Manifest) -> list[str]:
    """Fastest first: artifacts that would run on a GPU here, then CPU ones; within each, the throughput measured
    on a machine like this one (highest first), then unmeasured ones by the table's auto_rank, then by the
    row's precision order."""
    machine = Machine.this()

    def key(name: str) -> tuple:
        entry = manifest.artifacts[name]
        cls = runner_for(entry)
        spec = FORMAT_SPECS[cls.format]
        device = cls.device_kind(entry)
        speed = measured_throughput(entry, device, machine)
        rank = spec.precisions.index(entry.precision) if entry.precision in spec.precisions else len(spec.precisions)
        return device != "gpu", speed is None, -(speed or 0.0), spec.auto_rank, rank

    return sorted(names, key=key)


def auto_order(manifest: Manifest) -> list[str]:
    """Every artifact of the export, in the order `--runtime auto` tries them."""
    return preference_order(list(manifest.artifacts), manifest)


def _why(chosen: str, candidates: list[str], manifest: Manifest, name: str) -> str:
    """One line for the server log: what was chosen, by which numbers, measured where."""
    machine = Machine.this()
    speeds = []
    for c in candidates:
        entry = manifest.artifacts[c]
        m = entry.speed_on(machine, runner_for(entry).device_kind(entry))
        if m is not None and entry.servable:
            speeds.append(f"{c} {m.images_per_second:,.0f} img/s")
    if name not in ("auto", *RUNTIMES):
        return f"{chosen}: asked for by name"
    entry = manifest.artifacts[chosen]
    m = entry.speed_on(machine, runner_for(entry).device_kind(entry))
    if m is None:
        return (
            f"{chosen}: no servable artifact was measured on a machine like this one ({machine.describe()}); "
            "chosen by the formats table's order (run `transferkit benchmark RUN` here to measure)"
        )
    load = f", load {m.load}" if m.load is not None else ""
    return (
        f"{chosen}: the fastest verified artifact measured on this machine at batch {m.batch} "
        f"({'; '.join(speeds)}; by {m.by} {m.created}{load}; {machine.describe()})"
    )


def select_runtime(name: str, manifest: Manifest, export_dir: str | Path | None = None) -> Runtime:
    """`auto`, a runtime name or an artifact name -> an unloaded Runtime that can serve this export here, or a
    clear error. Its `selected_because` says why."""
    artifacts = manifest.artifacts
    if name in artifacts and name not in RUNTIMES:
        candidates = [name]
    elif name == "auto" or name in RUNTIMES:
        runtime_of = {a: runner_for(e).name for a, e in artifacts.items()}
        candidates = preference_order([a for a in artifacts if name == "auto" or runtime_of[a] == name], manifest)
    else:
        choices = ", ".join([*RUNTIME_CHOICES, *(a for a in artifacts if a not in RUNTIMES)])
        raise ConfigError(f"unknown runtime {name!r}; use one of {choices}")
    reasons = {}
    for candidate in candidates:
        problem = artifact_problem(candidate, manifest, export_dir)
        if problem is None:
            runtime = runner_for(artifacts[candidate])(artifact=candidate)
            runtime.selected_because = _why(candidate, candidates, manifest, name)
            return runtime
        reasons[candidate] = problem
    if name != "auto" and len(candidates) == 1:
        raise TransferkitError(f"runtime {name} cannot serve this export: {reasons[candidates[0]]}")
    if not candidates:
        fmt = spec_for_runtime(name).name
        raise TransferkitError(
            f"runtime {name} cannot serve this export: it has no {fmt} artifact (its artifacts: "
            f"{', '.join(artifacts) or 'none'}; transferkit export RUN --format {fmt})"
        )
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise TransferkitError(
        f"no {'runtime' if name == 'auto' else name + ' artifact'} can serve this export here ({detail})"
    )


def load_runtime(
    name: str, export_dir: str | Path, manifest: Manifest, threads: int | None = None, check_files: bool = False
) -> Runtime:
    """Select and load a runtime. `check_files`: read the artifact's files once, check them against the
    manifest's sha256 and load those bytes (serving does, so a file changed after export is never loaded)."""
    runtime = select_runtime(name, manifest, export_dir)
    verified = manifest.read_verified(export_dir, manifest.artifacts[runtime.artifact].files) if check_files else None
    runtime.threads = threads
    return runtime.load(export_dir, manifest, verified)
