"""`transferkit benchmark RUN`: every artifact of the export (format x precision), measured side by side in
one process.

    artifact  status  size  accuracy per dataset (verify.json)  ms b=1  ms b=32  img/s b=32  vs onnx  vs torch

The PyTorch eager model (model.pt) and every artifact are timed in the same run, so "vs onnx" (ONNX Runtime
fp32) and "vs torch" are ratios of measurements taken minutes apart on the same machine, not comparisons with
numbers from elsewhere. Latency is the median of `repeats` timed calls after warm-up, on random normalised
input of the model's size. Artifacts that are not servable, or cannot run here, are listed with the reason and
not timed; a runner with several runtime options (OpenVINO: latency and throughput hints) gets a row per option.
Writes RUN/export/benchmark.json, and records each servable artifact's batch-32 figure (its fastest options) in
the manifest as this machine's measurement: what `serve --runtime auto` picks by on this machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.export.formats import FORMATS
from transferkit.export.measure import MEASURE_BATCH
from transferkit.export.table import text_table
from transferkit.machine import Machine, load_average, median_seconds
from transferkit.manifest import VERIFY_NAME, Manifest, Measurement, now_utc, read_manifest, write_manifest
from transferkit.runtimes.runtime import runner_for
from transferkit.runtimes.selection import artifact_problem
from transferkit.utils import atomic_write_json, read_json

BASELINE = "pytorch (eager)"
ONNX_FP32 = "onnx"  # the "vs onnx" column's reference: ONNX Runtime at fp32


@dataclass
class BenchmarkRow:
    format: str
    status: str
    size_bytes: int | None = None
    precision: str = "fp32"
    accuracy: dict[str, float] = field(default_factory=dict)  # dataset -> accuracy of this artifact (verify.json)
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch size -> median ms per call
    note: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # the runtime options it was timed with

    def throughput(self, batch: int) -> float | None:
        ms = self.latency_ms.get(batch)
        return batch / (ms / 1000.0) if ms else None


def _median_ms(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    return median_seconds(call, repeats, warmup) * 1000.0


def _inputs(size: int, batches: tuple[int, ...]) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {b: rng.standard_normal((b, 3, size, size)).astype(np.float32) for b in batches}


def benchmark_run(
    run_dir: str | Path, batches: tuple[int, ...] = (1, 32), repeats: int = 20, record: bool = True
) -> list[BenchmarkRow]:
    """Time PyTorch and every artifact (each runtime option of runners that have several) side by side.
    `record`: the batch-32 figure of each servable artifact, with its fastest options, goes into the manifest
    (RUN/export and the stored model's copy) as this machine's measurement, which `--runtime auto` reads."""
    import torch

    from transferkit.runs import load_run_model

    export_dir = Path(run_dir) / "export"
    manifest = read_manifest(export_dir)
    verify = read_json(export_dir / VERIFY_NAME) if (export_dir / VERIFY_NAME).is_file() else {"formats": {}}
    inputs = _inputs(manifest.image_size, batches)

    model, _ = load_run_model(run_dir)
    model.to(memory_format=torch.channels_last)
    baseline = BenchmarkRow(BASELINE, "reference", (Path(run_dir) / "model.pt").stat().st_size)
    with torch.inference_mode():
        for b, x in inputs.items():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            baseline.latency_ms[b] = _median_ms(lambda t=t: model(t), repeats)
    rows = [baseline]

    exported = {e.format for e in manifest.artifacts.values()}
    for name in [f for f in FORMATS if f not in exported]:
        rows.append(BenchmarkRow(name, "not exported", note=f"transferkit export RUN --format {name}"))
    machine, load, big = Machine.this(), load_average(), max(batches)
    for name, entry in manifest.artifacts.items():
        size = sum((export_dir / f).stat().st_size for f in entry.files if (export_dir / f).is_file()) or None
        heads = (verify["formats"].get(name) or {}).get("heads", {})
        accuracy = {
            ds: d["accuracy_format"] for h, r in heads.items() for ds, d in (r.get("per_dataset") or {h: r}).items()
        }
        problem = artifact_problem(name, manifest, export_dir)
        if problem:
            rows.append(BenchmarkRow(name, entry.status, size, entry.precision, accuracy, note=problem))
            continue
        verified = manifest.read_verified(export_dir, entry.files)  # the bytes timed are the bytes verified
        timed = []
        cls = runner_for(entry)
        for options in cls.option_candidates():
            runtime = cls(artifact=name)
            runtime.options = options
            runtime.load(export_dir, manifest, verified)
            row = BenchmarkRow(name, entry.status, size, entry.precision, accuracy, options=options.to_dict())
            for b, x in inputs.items():
                row.latency_ms[b] = _median_ms(lambda rt=runtime, x=x: rt.run(x), repeats)
            row.note = runtime.description
            rows.append(row)
            timed.append((row, options, runtime))
        best, options, runtime = max(timed, key=lambda t: t[0].throughput(big) or 0)
        if big == MEASURE_BATCH:
            m = Measurement(
                round(best.throughput(big), 1),
                big,
                runtime.device_kind(entry),
                runtime.description,
                machine,
                load,
                "benchmark",
                now_utc(),
                options,
            )
            manifest = manifest.with_artifact(dataclasses.replace(entry.with_measurement(m), runtime_options=options))
    atomic_write_json(
        export_dir / "benchmark.json",
        {
            "batches": list(batches),
            "repeats": repeats,
            "machine": machine.to_dict(),
            "load": load,
            "rows": [asdict(r) for r in rows],
        },
    )
    if record:
        _record_measurements(export_dir, manifest)
    return rows


def _record_measurements(export_dir: Path, manifest: Manifest) -> None:
    """Write the new measurements into RUN/export/manifest.json and into the stored model's manifest (what
    `serve` reads), each entry the stored copy has."""
    write_manifest(export_dir, manifest)
    if not manifest.tag:
        return
    from transferkit.runtimes.resolve import stored_model_path

    stored_dir = stored_model_path(manifest.tag)
    if stored_dir is None or not (stored_dir / "manifest.json").is_file():
        return
    stored = read_manifest(stored_dir)
    for name in stored.artifacts:
        if name in manifest.artifacts:
            stored = stored.with_artifact(manifest.artifacts[name])
    write_manifest(stored_dir, stored)


def format_benchmark_table(rows: list[BenchmarkRow], batches: tuple[int, ...] = (1, 32), markdown: bool = False) -> str:
    """The table `transferkit benchmark` prints (markdown=True: the same as a Markdown table, for docs/)."""
    base = rows[0]
    onnx = next((r for r in rows if r.format == ONNX_FP32 and r.latency_ms), None)
    big = max(batches)
    header = (
        ["artifact", "status", "size", "accuracy"]
        + [f"ms b={b}" for b in batches]
        + [f"img/s b={big}", f"vs onnx b={big}", f"vs torch b={big}", "runtime / note"]
    )
    table = []
    for r in rows:
        acc = ", ".join(f"{h} {a:.2%}" for h, a in r.accuracy.items()) or "-"
        size = f"{r.size_bytes / 1e6:.1f} MB" if r.size_bytes else "-"
        lat = [f"{r.latency_ms[b]:.2f}" if b in r.latency_ms else "-" for b in batches]
        tput = r.throughput(big)
        timed = big in r.latency_ms
        vs_onnx = (
            f"{onnx.latency_ms[big] / r.latency_ms[big]:.2f}x" if timed and onnx and big in onnx.latency_ms else "-"
        )
        vs_torch = f"{base.latency_ms[big] / r.latency_ms[big]:.2f}x" if timed else "-"
        hint = r.options.get("performance_hint")
        name = f"{r.format} [{hint.lower()}]" if hint else r.format
        table.append([name, r.status, size, acc, *lat, f"{tput:,.0f}" if tput else "-", vs_onnx, vs_torch, r.note])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table])
    return text_table(header, table)
