"""What traffic capture costs a server: served req/s and p99 with `--capture` off, at 10% and at 100%, side by side
in rounds, at 32 px and 224 px. A section of docs/serving.md.

    BENTOML_HOME=runs/export-bench/bentoml python benchmarks/serve_capture.py \
        --run32 runs/export-bench/demo-32px --run224 runs/export-bench/fashion-224px-seed0 \
        [--seconds 15] [--concurrency 64] [--rounds 2]

Each row: `transferkit serve RUN` (default workers), warmed, then `hey` with --concurrency clients posting one real
image (a scikit-learn digit as PNG at 32 px, china.jpg at 224 px) for --seconds. Captured rows committed (from
/metrics), rows dropped and the capture folder's size are read after the load. Goal: >= 0.95x of off at 10%.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from loadgen import run_hey  # noqa: E402
from provenance import command_line, commit, write_section  # noqa: E402
from serve_repository import bodies  # noqa: E402

from transferkit.machine import Machine  # noqa: E402

BEGIN, END = "<!-- serve_capture: begin -->", "<!-- serve_capture: end -->"
RATES = (("off", 0.0), ("10%", 0.1), ("100%", 1.0))
PAUSE_S = 5.0


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name) and " " in line)


def one(run: str, rate: float, body: Path, content_type: str, args, work: Path) -> dict:
    import httpx

    from transferkit.serving import start_server

    folder = work / "capture"
    shutil.rmtree(folder, ignore_errors=True)
    extra = {"capture_dir": str(folder), "capture_rate": rate} if rate else {}
    with start_server(run, log_path=work / "serve.log", timeout=600, **extra) as server:
        url = server.url + "/predict"
        run_hey("hey", url, body, 0, 16, 60, "warm", content_type, seconds=3)
        level = run_hey(
            "hey", url, body, 0, args.concurrency, args.seconds + 60, "load", content_type, seconds=args.seconds
        )
        time.sleep(3)  # the writers' last flush
        text = httpx.get(server.url + "/metrics", timeout=10).text
    size = sum(p.stat().st_size for p in folder.rglob("*.parquet")) if folder.is_dir() else 0
    bad = sum(n for code, n in level.statuses.items() if code != 200) + sum(level.errors.values())
    return {
        "rps": level.ok_rps,
        "p99": level.latencies.get(99, float("nan")) * 1000,
        "bad": bad,
        "rows": metric(text, "transferkit_capture_rows_total"),
        "dropped": metric(text, "transferkit_capture_dropped_rows_total"),
        "mb": size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run32", required=True)
    parser.add_argument("--run224", required=True)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "serving.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-capture-"))
    machine = Machine.this()
    files = {}
    for size, (data, content_type) in bodies().items():
        files[size] = (work / f"body{size}", content_type)
        files[size][0].write_bytes(data)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for size, run in (("32", args.run32), ("224", args.run224)):
            order = RATES if r % 2 == 0 else tuple(reversed(RATES))  # a machine that slows down favours no one
            for name, rate in order:
                row = one(run, rate, *files[size], args, work)
                results.setdefault((size, name), []).append(row)
                print(size, name, row, flush=True)
                time.sleep(PAUSE_S)
    lines = [
        BEGIN,
        "### What capture costs (`serve --capture DIR`)",
        "",
        f"Command: `{command_line()}` at commit {commit()}. Machine: {machine.describe()}. Default workers, "
        f"{args.concurrency} clients for {args.seconds:g} s per row, {args.rounds} rounds (the order of the rates "
        "reversed every other round); medians.",
        "",
        "| image | capture | req/s | vs off | p99 ms | non-200 | rows captured | rows dropped | folder MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size in ("32", "224"):
        off = statistics.median(x["rps"] for x in results[size, "off"])
        for name, _ in RATES:
            rows = results[size, name]
            med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
            each = "/".join(f"{x['rps']:.0f}" for x in rows)
            lines.append(
                f"| {size} px | {name} | {med['rps']:.0f} ({each}) | {med['rps'] / off:.3f}x | {med['p99']:.0f} | "
                f"{sum(x['bad'] for x in rows)} | {med['rows']:.0f} | {med['dropped']:.0f} | {med['mb']:.1f} |"
            )
    lines += ["", END]
    print("\n".join(lines))
    write_section(args.out, "\n".join(lines), BEGIN, END)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
