"""`transferkit benchmark RUN`: every artifact of the export (format x precision), measured side by side in
one process.

    artifact  status  size  accuracy per dataset (verify.json)  ms b=1  ms b=32  img/s b=32  vs onnx  vs torch

The PyTorch eager model (model.pt) and every artifact are timed in the same run, so "vs onnx" (ONNX Runtime
fp32) and "vs torch" are ratios of measurements taken minutes apart on the same machine, not comparisons with
numbers from elsewhere. Latency is the median of `repeats` timed calls after warm-up, on random normalised
input of the model's size. Artifacts that are not servable, or cannot run here, are listed with the reason and
not timed. Writes RUN/export/benchmark.json.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from transferkit.artifact import entry_files, entry_format
from transferkit.export.formats import FORMATS
from transferkit.export.table import text_table
from transferkit.serving.manifest import VERIFY_NAME, read_manifest
from transferkit.serving.runtime import artifact_problem, runner_for
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

    def throughput(self, batch: int) -> float | None:
        ms = self.latency_ms.get(batch)
        return batch / (ms / 1000.0) if ms else None


def _median_ms(call: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def _inputs(size: int, batches: tuple[int, ...]) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {b: rng.standard_normal((b, 3, size, size)).astype(np.float32) for b in batches}


def benchmark_run(run_dir: str | Path, batches: tuple[int, ...] = (1, 32), repeats: int = 20) -> list[BenchmarkRow]:
    import torch

    from transferkit.runs import load_run_model

    export_dir = Path(run_dir) / "export"
    manifest = read_manifest(export_dir)
    verify = read_json(export_dir / VERIFY_NAME) if (export_dir / VERIFY_NAME).is_file() else {"formats": {}}
    inputs = _inputs(int(manifest["preprocessing"]["image_size"]), batches)

    model, _ = load_run_model(run_dir)
    model.to(memory_format=torch.channels_last)
    baseline = BenchmarkRow(BASELINE, "reference", (Path(run_dir) / "model.pt").stat().st_size)
    with torch.inference_mode():
        for b, x in inputs.items():
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            baseline.latency_ms[b] = _median_ms(lambda t=t: model(t), repeats)
    rows = [baseline]

    exported = {entry_format(n, e) for n, e in manifest["formats"].items()}
    for name in [f for f in FORMATS if f not in exported]:
        rows.append(BenchmarkRow(name, "not exported", note=f"transferkit export RUN --format {name}"))
    for name, entry in manifest["formats"].items():
        row = BenchmarkRow(name, entry["status"], precision=entry.get("precision", "fp32"))
        paths = [export_dir / f for f in entry_files(entry)]
        row.size_bytes = sum(p.stat().st_size for p in paths if p.is_file()) or None
        heads = (verify["formats"].get(name) or {}).get("heads", {})
        row.accuracy = {ds: d["accuracy_format"] for h, r in heads.items()
                        for ds, d in (r.get("per_dataset") or {h: r}).items()}  # fmt: skip
        problem = artifact_problem(name, manifest, export_dir)
        if problem:
            row.note = problem
        else:
            runtime = runner_for(name, entry)(artifact=name).load(export_dir, manifest)
            for b, x in inputs.items():
                row.latency_ms[b] = _median_ms(lambda rt=runtime, x=x: rt.run(x), repeats)
            row.note = runtime.description
        rows.append(row)
    atomic_write_json(export_dir / "benchmark.json", {"batches": list(batches), "repeats": repeats,
                                                      "rows": [asdict(r) for r in rows]})  # fmt: skip
    return rows


def format_benchmark_table(rows: list[BenchmarkRow], batches: tuple[int, ...] = (1, 32), markdown: bool = False) -> str:
    """The table `transferkit benchmark` prints (markdown=True: the same as a Markdown table, for docs/)."""
    base = rows[0]
    onnx = next((r for r in rows if r.format == ONNX_FP32 and r.latency_ms), None)
    big = max(batches)
    header = ["artifact", "status", "size", "accuracy"] + [f"ms b={b}" for b in batches] + [f"img/s b={big}",
              f"vs onnx b={big}", f"vs torch b={big}", "runtime / note"]  # fmt: skip
    table = []
    for r in rows:
        acc = ", ".join(f"{h} {a:.2%}" for h, a in r.accuracy.items()) or "-"
        size = f"{r.size_bytes / 1e6:.1f} MB" if r.size_bytes else "-"
        lat = [f"{r.latency_ms[b]:.2f}" if b in r.latency_ms else "-" for b in batches]
        tput = r.throughput(big)
        timed = big in r.latency_ms
        vs_onnx = f"{onnx.latency_ms[big] / r.latency_ms[big]:.2f}x" if timed and onnx and big in onnx.latency_ms else "-"
        vs_torch = f"{base.latency_ms[big] / r.latency_ms[big]:.2f}x" if timed else "-"
        table.append([r.format, r.status, size, acc, *lat, f"{tput:,.0f}" if tput else "-", vs_onnx, vs_torch, r.note])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table])
    return text_table(header, table)
