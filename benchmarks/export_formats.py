"""Every format x precision, exported, gated and timed side by side: the demo model at 32 px and several runs at
224 px (the compute of photos); writes docs/export.md.

    python benchmarks/export_formats.py [--run runs/demo] [--photo-runs 3] [--limit 600] [--repeats 20]
                                        [--workdir runs/export-bench]

Phase 1 (builds, the machine may be busy): the 32 px run is copied into `--workdir` (its own export is left
alone); `--photo-runs` MobileNetV2 runs are fine-tuned there on Fashion-MNIST resized to 224 px (seeds 0, 1, 2,
...; `--limit` images per split, one epoch; a run already trained there is reused); each run is exported as onnx and openvino at fp32 and int8 (plus onnx fp16 at 32 px) with the
default gate, INT8 search and budget, timing each artifact's export.
Phase 2 (timing, on an idle machine: the load average is recorded before and after): `transferkit benchmark`
times every servable artifact of every run in one process, OpenVINO under each performance hint, at batch 1
and 32, so every ratio "vs onnx" (ONNX Runtime fp32) comes from the same run; the figures go into each run's
manifest as this machine's measurements. The exports are stored in `--workdir`/bentoml (set BENTOML_HOME to it
to serve them, as benchmarks/serve_artifacts.py does).
The report records the command, the commit, the CPU (name, instruction sets, whether it has VNNI), the loads,
per run the benchmark table, which INT8 attempt was chosen and what it kept in fp32, and a summary of the
INT8 goals (servable INT8 >= 2.5x ONNX Runtime fp32 at batch 32 inside the gate, file <= 0.3x fp32).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from provenance import command_line, commit, write_report  # noqa: E402

from transferkit.machine import Machine, load_average  # noqa: E402


def train_photo_run(out: Path, seed: int, limit: int) -> Path:
    """MobileNetV2 (ImageNet) fine-tuned on Fashion-MNIST at 224 px: one epoch on `limit` train images."""
    if (out / "model.pt").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run: train it again
    cmd = [
        sys.executable,
        "-m",
        "transferkit",
        "train",
        "--data",
        "fashion-mnist",
        "--image-size",
        "224",
        "--limit",
        str(limit),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def export_one(run_dir: Path, precisions: str) -> tuple[object, dict[str, float]]:
    from transferkit.export import export_run

    result = export_run(run_dir, formats="onnx,openvino", precision=precisions)
    return result, {name: r.export_seconds or 0.0 for name, r in result.formats.items()}


def attempt_lines(result) -> list[str]:
    """Per INT8 artifact: each attempt with its status, validation numbers, speed and seconds."""
    lines = []
    for name, r in result.formats.items():
        attempts = (r.details or {}).get("attempts")
        if not attempts:
            continue
        q = r.details["quantization"]
        kept = r.details.get("fp32_layers") or []
        lines.append(
            f"- `{name}`: gate on test **{r.status}**; chosen `{q['chosen']}` "
            f"({'passed' if q['passed_on_validation'] else 'failed'} on validation); kept in fp32: "
            f"{len(kept)} ({', '.join(f'`{x}`' for x in kept[:6])}{', ...' if len(kept) > 6 else ''})"
        )
        for a in attempts:
            v = a.get("validation", {})
            deltas = ", ".join(f"{d} {x:+.2f}" for d, x in v.get("accuracy_delta_points", {}).items())
            speed = f", {a['images_per_second']:,.0f} img/s" if a.get("images_per_second") else ""
            seconds = f", {a['seconds']:.0f} s" if "seconds" in a else ""
            numbers = f": Δacc {deltas}" if deltas else (f": {a['error']}" if a.get("error") else "")
            lines.append(f"  - `{a['name']}` {a['status']}{numbers}{speed}{seconds}")
    return lines


def summary_row(label: str, rows, result, export_s: dict[str, float]) -> list[str]:
    """One line of the INT8 goals table: the fastest servable INT8 artifact of a run against ONNX Runtime fp32."""
    timed = {
        r.format + (f" [{r.options['performance_hint'].lower()}]" if r.options.get("performance_hint") else ""): r
        for r in rows
        if 32 in r.latency_ms
    }
    onnx = timed.get("onnx")
    int8 = [(k, r) for k, r in timed.items() if r.precision == "int8"]
    if not onnx or not int8:
        return [f"| {label} | - | no servable INT8 artifact | - | - | - | - |"]
    name, best = max(int8, key=lambda kr: kr[1].throughput(32))
    fp32_sizes = {r.format: r.size_bytes for r in rows if r.precision == "fp32" and r.size_bytes}
    base = fp32_sizes.get(best.format.replace("-int8", ""))
    size = f"{best.size_bytes / base:.2f}x" if base and best.size_bytes else "-"
    ort_int8 = timed.get("onnx-int8")
    ort = f"{onnx.latency_ms[32] / ort_int8.latency_ms[32]:.2f}x" if ort_int8 else "not servable"
    kept = len(result.formats[best.format].details.get("fp32_layers") or [])
    seconds = max(export_s.get("onnx-int8", 0.0), export_s.get("openvino-int8", 0.0))
    return [
        f"| {label} | {name} | {onnx.latency_ms[32] / best.latency_ms[32]:.2f}x | {ort} | {size} | {kept} | "
        f"{seconds:.0f} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="the 32 px run (make demo makes runs/demo)")
    parser.add_argument("--photo-runs", type=int, default=3, help="224 px runs to train, export and time")
    parser.add_argument("--limit", type=int, default=600, help="images per split of each 224 px run")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "export.md"))
    parser.add_argument(
        "--workdir", default=str(ROOT / "runs" / "export-bench"), help="where the runs and their store go"
    )
    args = parser.parse_args()

    from transferkit.export import format_export_table
    from transferkit.export.benchmark import benchmark_run, format_benchmark_table

    machine = Machine.this()
    runs: list[tuple[str, Path, str]] = []
    work = Path(args.workdir)
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # the user's own store stays as it is
    demo = work / "demo-32px"
    shutil.rmtree(demo, ignore_errors=True)
    shutil.copytree(args.run, demo, ignore=shutil.ignore_patterns("export"))
    runs.append((f"32 px demo run `{Path(args.run).name}`", demo, "fp32,int8,fp16"))
    for seed in range(args.photo_runs):
        out = train_photo_run(work / f"fashion-224px-seed{seed}", seed, args.limit)
        runs.append((f"224 px Fashion-MNIST, seed {seed}, {args.limit} images per split", out, "fp32,int8"))

    exports = []
    for _label, run_dir, precisions in runs:  # phase 1
        shutil.rmtree(run_dir / "export", ignore_errors=True)  # every artifact made by this commit
        start = time.perf_counter()
        result, seconds = export_one(run_dir, precisions)
        exports.append((result, seconds, time.perf_counter() - start))
        print(format_export_table(result), flush=True)

    load_before = load_average()  # phase 2: the timing, side by side
    timings = [benchmark_run(run_dir, repeats=args.repeats) for _, run_dir, _ in runs]
    load_after = load_average()

    command = command_line()
    lines = [
        "# Export: every format x precision, gated and timed (32 px and 224 px)",
        "",
        f"Command: `{command.strip()}` at commit {commit()}. Machine: {machine.describe()}; INT8 dot-product "
        f"instructions (VNNI): {'yes' if machine.vnni else '**no**'}. Load average (1 min) while timing: "
        f"{load_before} before, {load_after} after.",
        "",
        "Gate: every artifact against PyTorch fp32 on held-out **test** images of every dataset (fp32: 0.5 point, 99% "
        "agreement; fp16: 0.3 point, 99.5%; int8: 1 point per dataset, 97%). INT8 attempts are chosen on the "
        "**validation** split (bounds tightened to 75%), calibrated on train images. Latency: median of the repeats, "
        "all runs timed in one process after all exports, ratios from the same process.",
        "",
        "## INT8 goals",
        "",
        "| run | fastest servable INT8 | vs ORT fp32, batch 32 | ORT INT8 vs ORT fp32 | size vs fp32 | layers kept in fp32 | "
        "INT8 export s (slowest artifact) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, _, _), rows, (result, seconds, _) in zip(runs, timings, exports):
        lines += summary_row(label, rows, result, seconds)
    for (label, _, _), rows, (result, seconds, total) in zip(runs, timings, exports):
        lines += [
            "",
            f"## {label}",
            "",
            f"Export of every artifact: {total:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
            + ").",
            "",
            format_benchmark_table(rows, markdown=True),
            "",
            "INT8 attempts:",
            "",
            *(attempt_lines(result) or ["- none"]),
            "",
        ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
