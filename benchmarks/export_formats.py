"""Every format x precision of one trained run, exported, gated and timed side by side; writes docs/export.md.

    python benchmarks/export_formats.py [--run runs/demo] [--repeats 30] [--out docs/export.md]

The run is copied first (its own export is left alone), then exported as onnx and openvino at fp32 and int8
plus onnx at fp16, with the default gate and INT8 repair, and `transferkit benchmark` times every artifact that
passed in one process (ratios "vs onnx" and "vs torch" come from the same run). The Markdown file records the
command, the commit, the machine, the export table (with the INT8 repair's steps) and the benchmark table.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from provenance import commit  # noqa: E402


def repair_lines(result) -> list[str]:
    lines = []
    for name, r in result.formats.items():
        repair = (r.details or {}).get("repair")
        if not repair:
            continue
        lines.append(f"- `{name}`: {'passed' if repair['passed'] else 'failed'} the gate; layers kept in fp32: "
                     f"{', '.join(f'`{x}`' for x in repair['fp32_layers']) or 'none'}")  # fmt: skip
        for step in repair["steps"]:
            agreement = ", ".join(f"{h} {a:.1%}" for h, a in step["top1_agreement"].items())
            accuracy = ", ".join(f"{d} {a:.1%}" for d, a in step["accuracy"].items())
            verdict = "pass" if step["passed"] else "fail"
            lines.append(f"  - {len(step['fp32_layers'])} layer(s) in fp32: {verdict}; accuracy {accuracy}; "
                         f"top-1 agreement {agreement}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="a trained run (make demo makes runs/demo)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "docs" / "export.md"))
    args = parser.parse_args()

    from transferkit.export import export_run, format_export_table
    from transferkit.export.benchmark import benchmark_run, format_benchmark_table
    from transferkit.runs import load_run

    trained = load_run(Path(args.run))
    what = (f"run `{Path(args.run).name}` ({trained.config.backbone}, {trained.preprocessing.image_size} px, "
            f"{', '.join(trained.labels.datasets)})")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="transferkit-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        shutil.copytree(args.run, run_dir, ignore=shutil.ignore_patterns("export"))
        start = time.perf_counter()
        result = export_run(run_dir, formats="onnx,openvino", precision="fp32,int8,fp16", store=False)
        export_s = time.perf_counter() - start
        table = format_export_table(result)
        rows = benchmark_run(run_dir, repeats=args.repeats)
    bench = format_benchmark_table(rows, markdown=True)
    print(table, "\n", bench, sep="")

    command = "python benchmarks/export_formats.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        f"# Export: every format x precision of {what}, gated and timed",
        "",
        f"Command: `{command.strip()}` at commit {commit()}, on {platform.processor() or platform.machine()} "
        f"with {os.cpu_count()} CPUs ({'AVX-512' if 'avx512' in open('/proc/cpuinfo').read() else 'AVX2, no VNNI'}), "
        f"{what}. Export and gate of all artifacts: {export_s:.0f} s.",
        "",
        "Gate: every artifact against PyTorch fp32 on held-out test images of every dataset (fp32: 0.5 point, 99% "
        "agreement; fp16: 0.3 point, 99.5%; int8: 1 point per dataset, 97%). fp16 ONNX is verified here and served on "
        "GPUs only. Latency: median of the repeats, one process, ratios from the same run.",
        "",
        "## Benchmark",
        "",
        bench,
        "",
        "## INT8 repair",
        "",
        *(repair_lines(result) or ["- no INT8 artifact needed a repair"]),
        "",
        "## Export table",
        "",
        "```",
        table,
        "```",
        "",
    ])
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
