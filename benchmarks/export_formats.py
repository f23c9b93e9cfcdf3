"""Every format x precision, exported, gated and timed side by side, post-training INT8 beside quantization-aware
INT8: the demo recipe at 32 px and several runs at 224 px (the compute of photos); writes docs/export.md.

    python benchmarks/export_formats.py [--run RUN32] [--photo-runs 3] [--limit 600] [--repeats 20]
                                        [--workdir runs/export-bench]

Phase 1 (builds, the machine may be busy): the 32 px run (default: the demo recipe's data, MNIST + Fashion-MNIST,
3,000 images each, 2 epochs, trained into `--workdir` on first use) and `--photo-runs` MobileNetV2 runs
fine-tuned on Fashion-MNIST resized to 224 px with the default settings (seeds 0, 1, 2, ...; `--limit` images per
split; `--batch-size auto`, 3 epochs), plus one deliberately lightly trained 224 px run (one epoch at batch 128:
5 optimiser steps), the hard case. Each run is exported as onnx and openvino at fp32, int8 and bf16 (plus onnx
fp16 at 32 px) with the default gate, search and budget (`--qat auto`), timing each artifact's export; then (the
first `--qat-runs` runs) a copy of it is exported at int8 with `--qat always`, the quantization-aware model on
its own, for the comparison, with the budget QAT_ALWAYS gives it (a step takes about 6 s at 224 px on two cores:
the default budget fits too few).
Phase 2 (timing, on an idle machine: the load average is recorded before and after): `transferkit benchmark`
times every servable artifact of every run and copy in one process, OpenVINO under each performance hint, at
batch 1 and 32, so every ratio "vs onnx" (ONNX Runtime fp32) comes from the same process.
The report records the command, the commit, the CPU (name, instruction sets, VNNI, bf16), the loads, per run the
benchmark table, the gate's numbers and every INT8 attempt, and a summary of the goals (servable INT8 >= 2.5x
ONNX Runtime fp32 at batch 32 inside the gate and fully INT8; export time).
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

QAT_ALWAYS = {"qat": "always", "qat_steps": 50, "int8_budget_s": 900.0}  # the `--qat always` copies


def train(out: Path, args: list[str]) -> Path:
    """A run trained by the CLI into `out`, unless one finished there already."""
    if (out / "model.pt").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run: train it again
    subprocess.run([sys.executable, "-m", "transferkit", "train", *args, "--out", str(out)], check=True, cwd=ROOT)
    return out


def train_photo_run(out: Path, seed: int, limit: int, light: bool = False) -> Path:
    """MobileNetV2 (ImageNet) fine-tuned on Fashion-MNIST at 224 px on `limit` images per split: the default
    settings, or (`light`) one epoch at batch 128."""
    schedule = ["--epochs", "1", "--batch-size", "128"] if light else ["--epochs", "3", "--batch-size", "auto"]
    data = ["--data", "fashion-mnist", "--image-size", "224", "--limit", str(limit), "--seed", str(seed)]
    return train(out, data + schedule)


def export_one(run_dir: Path, precisions: str, **options) -> tuple[object, dict[str, float]]:
    from transferkit.export import export_run
    from transferkit.export.job import ExportOptions

    result = export_run(run_dir, formats="onnx,openvino", precision=precisions, options=ExportOptions(**options))
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
            bounds = v.get("drop_upper_points", {})
            drops = ", ".join(
                f"{d} {-x:+.2f} (bound {bounds.get(d, float('nan')):+.2f})"
                for d, x in v.get("accuracy_delta_points", {}).items()
            )
            speed = f", {a['images_per_second']:,.0f} img/s" if a.get("images_per_second") else ""
            seconds = f", {a['seconds']:.0f} s" if "seconds" in a else ""
            training = (a.get("qat") or {}).get("training")
            trained = f", QAT {training['steps']} steps in {training['seconds']:.0f} s" if training else ""
            numbers = f": drop {drops}" if drops else (f": {a['error']}" if a.get("error") else "")
            lines.append(f"  - `{a['name']}` {a['status']}{numbers}{speed}{trained}{seconds}")
    return lines


def worst_bound(result, name: str) -> str:
    """The gate's worst dataset for one artifact: its drop and upper bound, or '-'."""
    r = result.formats.get(name)
    heads = ((r.verification or {}).get("heads") or {}) if r else {}
    datasets = [d for h in heads.values() for d in h["per_dataset"].values()]
    if not datasets:
        return "-"
    worst = max(datasets, key=lambda d: d["drop_upper_points"] if d["drop_upper_points"] is not None else -1e9)
    bound = worst["drop_upper_points"]
    return f"{worst['drop_points']:+.2f} (≤ {bound:.2f}, n={worst['images']})" if bound is not None else "-"


def _timed(rows) -> dict[str, object]:
    return {
        r.format + (f" [{r.options['performance_hint'].lower()}]" if r.options.get("performance_hint") else ""): r
        for r in rows
        if 32 in r.latency_ms
    }


def summary_row(label: str, rows, result, export_total: float, qat_rows, qat_result, qat_total: float) -> str:
    """One line of the goals table: the fastest servable INT8 artifact of a run against ONNX Runtime fp32, the
    bf16 artifact, and the quantization-aware model on its own."""
    timed, qat_timed = _timed(rows), _timed(qat_rows or [])
    onnx = timed.get("onnx")

    def vs(r, batch: int = 32) -> str:
        return f"{onnx.latency_ms[batch] / r.latency_ms[batch]:.2f}x" if onnx and r and batch in r.latency_ms else "-"

    int8 = [(k, r) for k, r in timed.items() if r.precision == "int8"]
    if int8:
        name, best = max(int8, key=lambda kr: kr[1].throughput(32))
        artifact = best.format
        kept = len(result.formats[artifact].details.get("fp32_layers") or [])
        chosen = result.formats[artifact].details["quantization"]["chosen"]
        int8_cells = f"{name} (`{chosen}`) | {vs(best)} | {vs(best, 1)} | {kept} | {worst_bound(result, artifact)}"
    else:
        int8_cells = "no servable INT8 | - | - | - | -"
    bf16 = next((r for k, r in timed.items() if r.precision == "bf16"), None)
    qat = [(k, r) for k, r in qat_timed.items() if r.precision == "int8"]
    if qat_result is None:
        qat_cells = "not run (--qat-runs)"
    elif qat:
        name, best = max(qat, key=lambda kr: kr[1].throughput(32))
        qat_onnx = qat_timed.get("onnx") or onnx
        ratio = f"{qat_onnx.latency_ms[32] / best.latency_ms[32]:.2f}x" if qat_onnx else "-"
        qat_cells = f"{name}: {ratio}, {worst_bound(qat_result, best.format)}"
    else:
        status = "; ".join(f"{n} {r.status}" for n, r in qat_result.formats.items() if r.requested)
        qat_cells = f"not servable ({status})"
    bf16_cells = f"{vs(bf16)}, {worst_bound(result, 'openvino-bf16')}" if bf16 else "not servable"
    return f"| {label} | {int8_cells} | {bf16_cells} | {qat_cells} | {export_total:.0f} | {qat_total:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="the 32 px run (default: the demo recipe, trained here)")
    parser.add_argument("--photo-runs", type=int, default=3, help="224 px runs to train, export and time")
    parser.add_argument("--limit", type=int, default=600, help="images per split of each 224 px run")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--qat-runs", type=int, default=2, help="runs (in order) also exported with --qat always")
    parser.add_argument("--out", default=str(ROOT / "docs" / "export.md"))
    parser.add_argument(
        "--workdir", default=str(ROOT / "runs" / "export-bench"), help="where the runs and their store go"
    )
    args = parser.parse_args()

    from transferkit.export import format_export_table
    from transferkit.export.benchmark import benchmark_run, format_benchmark_table

    machine = Machine.this()
    work = Path(args.workdir)
    os.environ["BENTOML_HOME"] = str(work / "bentoml")  # the user's own store stays as it is
    demo = work / "demo-32px"
    if args.run:
        shutil.rmtree(demo, ignore_errors=True)
        shutil.copytree(args.run, demo, ignore=shutil.ignore_patterns("export"))
    else:
        recipe = ["--data", "mnist,fashion-mnist", "--limit", "3000", "--epochs", "2", "--image-size", "32"]
        train(demo, recipe)
    runs: list[tuple[str, Path, str]] = [
        ("32 px, MNIST + Fashion-MNIST, 3,000 each, 2 epochs", demo, "fp32,int8,fp16,bf16")
    ]
    for seed in range(args.photo_runs):
        out = train_photo_run(work / f"fashion-224px-seed{seed}", seed, args.limit)
        runs.append((f"224 px Fashion-MNIST, seed {seed}, {args.limit} per split", out, "fp32,int8,bf16"))
    if args.photo_runs:
        light = train_photo_run(work / "fashion-224px-light", 0, args.limit, light=True)
        runs.append(
            (f"224 px Fashion-MNIST, lightly trained (5 steps), {args.limit} per split", light, "fp32,int8,bf16")
        )

    exports, qat_exports = [], []
    for _label, run_dir, precisions in runs:  # phase 1
        shutil.rmtree(run_dir / "export", ignore_errors=True)  # every artifact made by this commit
        start = time.perf_counter()
        result, seconds = export_one(run_dir, precisions)
        exports.append((result, seconds, time.perf_counter() - start))
        print(format_export_table(result), flush=True)
        if len(qat_exports) >= args.qat_runs:
            continue
        qat_dir = run_dir.with_name(run_dir.name + "-qat")
        shutil.rmtree(qat_dir, ignore_errors=True)
        shutil.copytree(run_dir, qat_dir, ignore=shutil.ignore_patterns("export"))
        start = time.perf_counter()
        qat_result, qat_seconds = export_one(qat_dir, "fp32,int8", **QAT_ALWAYS)
        qat_exports.append((qat_dir, qat_result, qat_seconds, time.perf_counter() - start))
        print(format_export_table(qat_result), flush=True)

    load_before = load_average()  # phase 2: the timing, side by side
    timings = [benchmark_run(run_dir, repeats=args.repeats) for _, run_dir, _ in runs]
    qat_timings = [benchmark_run(qat_dir, repeats=args.repeats) for qat_dir, *_ in qat_exports]  # the first runs
    load_after = load_average()

    bf16 = "yes" if "avx512_bf16" in machine.flags or "amx_bf16" in machine.flags else "**no**"
    lines = [
        "# Export: every format x precision, gated and timed (32 px and 224 px)",
        "",
        f"Command: `{command_line().strip()}` at commit {commit()}. Machine: {machine.describe()}; INT8 dot-product "
        f"instructions (VNNI): {'yes' if machine.vnni else '**no**'}; native bf16: {bf16}. Load average (1 min) "
        f"while timing: {load_before} before, {load_after} after.",
        "",
        "Gate: every artifact against PyTorch fp32, image by image, on the held-out **test** split of every dataset "
        "(`--verify-images auto`: all of it up to 50 megapixels, at least 2,000 images per dataset). fp32 and fp16: "
        "logits within 1e-3 / 5e-2 of scale, measured drop <= 0.5 / 0.3 point. INT8 and bf16: the drop's one-sided "
        "95% upper bound <= 1 point per dataset (a gain never fails); the table gives the worst dataset's measured "
        "drop, its bound and the images. INT8 attempts are chosen on the **validation** split (bound at 99.8%), "
        "calibrated and fine-tuned on train images. Latency: median of the repeats, all runs timed in one process "
        "after all exports, ratios from the same process.",
        "",
        "## Goals",
        "",
        "INT8 columns: the fastest servable INT8 artifact of the default export (`--qat auto`: post-training first, "
        "quantization-aware only if that fails, mixed precision last) and its speed against ONNX Runtime fp32 at "
        "batch 32 and 1; layers kept in fp32 (0: fully INT8). QAT column: a copy exported with `--qat always` (no "
        f"post-training attempt; at most {QAT_ALWAYS['qat_steps']} steps, INT8 budget "
        f"{QAT_ALWAYS['int8_budget_s']:.0f} s), its fastest servable INT8 artifact.",
        "",
        "| run | fastest servable INT8 (chosen attempt) | vs ORT fp32 b=32 | b=1 | fp32 layers | INT8 drop (bound, images) "
        "| bf16 vs ORT fp32, drop | `--qat always`: vs ORT fp32, drop | export s (all artifacts) | QAT export s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    no_qat = (None, None, {}, 0.0)
    qat_exports += [no_qat] * (len(runs) - len(qat_exports))
    qat_timings += [[]] * (len(runs) - len(qat_timings))
    for (label, _, _), rows, (result, _, total), qat_rows, (_, qat_result, _, qat_total) in zip(
        runs, timings, exports, qat_timings, qat_exports
    ):
        lines.append(summary_row(label, rows, result, total, qat_rows, qat_result, qat_total))
    for (label, _, _), rows, (result, seconds, total), qat_rows, (_, qat_result, qat_seconds, _) in zip(
        runs, timings, exports, qat_timings, qat_exports
    ):
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
        if qat_result is None:
            continue
        lines += [
            "With `--qat always` (" + ", ".join(f"{k} {v:.0f} s" for k, v in qat_seconds.items()) + "):",
            "",
            format_benchmark_table(qat_rows, markdown=True),
            "",
            *(attempt_lines(qat_result) or ["- none"]),
            "",
        ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
