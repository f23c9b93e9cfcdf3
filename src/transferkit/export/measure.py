"""Timing, once for every caller: how export records an artifact's speed (and picks its runtime options), how the
INT8 search compares attempts, how `transferkit benchmark` times every artifact, how `transferkit eval` sets a
distilled student's latency beside its teachers', and how the benchmarks time a call.

    seconds = median_seconds(lambda: runtime.run(x), repeats=7)     # after warm-up calls
    student, teacher = interleaved_medians([run_student, run_teacher], repeats=10)   # side by side
    measurement, tuning = measure_artifact(make_runtime, runtime, export_dir, manifest, images)

The clocks themselves (`median_seconds`, `interleaved_medians`) are transferkit.machine's, below every package
that times something. Each figure is recorded with the machine (CPU name, instruction sets, cores) and its load average, because
`--runtime auto` trusts a speed only on a machine like the one it was measured on (transferkit.machine).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.machine import Machine, load_average, median_seconds
from transferkit.manifest import Manifest, Measurement, now_utc

if TYPE_CHECKING:
    from transferkit.runtimes.runtime import Runtime

MEASURE_BATCH = 32  # the batch serving's batcher fills under load (its --max-batch default)


def batch_of(images: np.ndarray, n: int = MEASURE_BATCH) -> np.ndarray:
    """`n` images (repeating `images` when there are fewer), contiguous."""
    return np.ascontiguousarray(np.resize(images, (n, *images.shape[1:])))


def measure_artifact(
    make_runtime: Callable[[], Runtime],
    verified: Runtime,
    export_dir: Path,
    manifest: Manifest,
    images: np.ndarray,
    repeats: int = 7,
    by: str = "export",
) -> tuple[Measurement | None, list[dict[str, Any]]]:  # noqa: E501
    """Images/s at batch 32 under each runtime option the runner offers (OpenVINO: latency and throughput
    hints); -> the fastest as a Measurement, and every option's figure. The runtime that verified the artifact
    is timed for the default options, so nothing is loaded twice for a runner with one option."""
    x = batch_of(images)
    entry = manifest.artifacts[verified.artifact]
    machine, load = Machine.this(), load_average()
    # verify runs ONNX on the CPU provider whatever the machine has: that is where it was measured
    cpu_only = getattr(verified, "providers", None) == ["CPUExecutionProvider"]
    device = "cpu" if cpu_only else verified.device_kind(entry)
    results: list[tuple[float, Any]] = []
    tuning: list[dict[str, Any]] = []
    for k, options in enumerate(type(verified).option_candidates()):
        try:
            runtime = verified if k == 0 else _loaded(make_runtime(), options, export_dir, manifest)
            speed = MEASURE_BATCH / median_seconds(lambda rt=runtime: rt.run(x), repeats)
        except Exception as exc:  # noqa: BLE001 - a measurement is optional; the artifact passed verify
            tuning.append({"runtime_options": options.to_dict(), "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        results.append((speed, options, runtime.description))
        tuning.append({"runtime_options": options.to_dict(), "images_per_second": round(speed, 1)})
    if not results:
        return None, tuning
    speed, options, description = max(results, key=lambda r: r[0])
    return Measurement(
        round(speed, 1), MEASURE_BATCH, device, description, machine, load, by, now_utc(), options
    ), tuning


def _loaded(runtime: Runtime, options, export_dir: Path, manifest: Manifest) -> Runtime:
    runtime.options = options
    return runtime.load(export_dir, manifest)
