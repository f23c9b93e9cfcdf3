"""The Open Inference Protocol's infer against POST /predict on the same server: requests/s at 64 clients for one
image per request, /predict with the raw image as the body against v2 infer with the image as a binary BYTES
tensor (the binary tensor extension: JSON header, then the file) and as base64 in a JSON tensor.

    python benchmarks/serve_v2.py [--small-run runs/export-bench/demo-32px] [--photo-run ...] [--seconds 8]

The runs are those benchmarks/export_formats.py writes (the 32 px demo model and a 224 px Fashion-MNIST model),
served from the BentoML home it filled; the same server answers every route, 2 workers x 1 ONNX Runtime
thread as in serve_peers.py. Routes alternate for `--rounds` rounds so drift hits both alike. The v2 request
asks for what /predict answers (top-5 labels and scores per head), as binary outputs. The table replaces the
section between this benchmark's markers in docs/serving.md (serve_peers.py keeps it when it rewrites the rest).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Level, run_hey  # noqa: E402
from provenance import command_line, commit, write_section  # noqa: E402
from serve_peers import THREADS, WORKERS, bodies, transferkit_server  # noqa: E402

from transferkit.machine import Machine, load_average  # noqa: E402

CLIENTS = 64
BEGIN, END = "<!-- serve_v2.py: begin -->", "<!-- serve_v2.py: end -->"


def v2_bodies(workdir: Path, image: Path, heads: list[str]) -> dict[str, tuple[Path, dict[str, str], str]]:
    """route name -> (body file, extra headers, content type) for one image."""
    data = image.read_bytes()
    outputs = [
        {"name": f"{h}.{kind}", "parameters": {"binary_data": True}} for h in heads for kind in ("labels", "scores")
    ]
    binary = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data) + 4}}
            ],
            "outputs": outputs,
        }
    ).encode()
    as_json = json.dumps(
        {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(data).decode()]}],
            "outputs": outputs,
        }
    ).encode()
    (workdir / f"{image.name}.v2-binary").write_bytes(binary + len(data).to_bytes(4, "little") + data)
    (workdir / f"{image.name}.v2-json").write_bytes(as_json)
    return {
        "v2 infer, binary BYTES": (
            workdir / f"{image.name}.v2-binary",
            {"Inference-Header-Content-Length": str(len(binary))},
            "application/octet-stream",
        ),
        "v2 infer, JSON base64": (workdir / f"{image.name}.v2-json", {}, "application/json"),
    }


def measure_size(hey: str, run: Path, image: Path, mime: str, work: Path, args) -> list[tuple[str, Level, str]]:
    from transferkit.manifest import read_manifest

    heads = list(read_manifest(run / "export").heads)
    routes = {"/predict, raw body": (image, {}, mime), **v2_bodies(work, image, heads)}
    out = []
    with transferkit_server(run, work / "logs" / f"{run.name}.log") as server:
        name = server.tag.split(":")[0]
        urls = {"/predict, raw body": server.url + "/predict"}
        urls.update({r: f"{server.url}/v2/models/{name}/infer" for r in routes if r.startswith("v2")})
        for route, (body, headers, content_type) in routes.items():  # warm-up, and every route answers 200
            level = run_hey(hey, urls[route], body, 200, 16, 60, "warm-up", content_type, headers=headers)
            if set(level.statuses) != {200}:
                sys.exit(f"serve_v2: {route} answered {level.counts()}; see {server.log_path}")
        for _ in range(args.rounds):
            for route, (body, headers, content_type) in routes.items():
                load = load_average()
                level = run_hey(
                    hey, urls[route], body, 0, CLIENTS, args.seconds + 60, route, content_type, args.seconds, headers
                )
                out.append((route, level, load))
    return out


def report(results: dict[int, list[tuple[str, Level, str]]], machine: Machine, args, images: dict) -> list[str]:
    lines = [
        BEGIN,
        "## The Open Inference Protocol against /predict (benchmarks/serve_v2.py)",
        "",
        f"Command: `{command_line()}` at commit {commit()}. Machine: {machine.describe()}. One transferkit server "
        f"per model, {WORKERS} workers x {THREADS} ONNX Runtime thread, onnx fp32; `hey` with {CLIENTS} keep-alive "
        f"clients, {args.seconds:g} s per level, routes alternating over {args.rounds} rounds. One image per request: "
        f"the {images['digit.png'][0].stat().st_size}-byte PNG digit at 32 px, china.jpg "
        f"({images['china.jpg'][0].stat().st_size:,} bytes) at 224 px. The v2 requests ask for the top-5 labels and "
        "scores of each head as binary outputs (what /predict answers).",
        "",
        "| size | route | round | req/s | vs /predict (same round) | p50 ms | p99 ms | answers | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for size, rows in results.items():
        per_round = len(rows) // args.rounds
        ratios: dict[str, list[float]] = {}
        for k in range(args.rounds):
            chunk = rows[k * per_round : (k + 1) * per_round]
            base = next(level for route, level, _ in chunk if route.startswith("/predict"))
            for route, level, load in chunk:
                ratio = level.ok_rps / base.ok_rps if base.ok_rps else 0.0
                ratios.setdefault(route, []).append(ratio)
                p50, p99 = (f"{level.latencies[p] * 1000:.0f}" if p in level.latencies else "-" for p in (50, 99))
                lines.append(
                    f"| {size} px | {route} | {k + 1} | {level.ok_rps:,.0f} | {ratio:.2f}x | {p50} | {p99} | "
                    f"{level.counts()} | {load} |"
                )
        for route, values in ratios.items():
            if route.startswith("v2"):
                summary.append(
                    f"- {size} px, {route}: **{sum(values) / len(values):.2f}x** /predict (mean of the rounds)"
                )
    lines += [
        "",
        "Goal: the binary BYTES path within 0.9x of /predict with a raw body at 64 clients.",
        "",
        *summary,
        END,
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-run", default=str(ROOT / "runs" / "export-bench" / "demo-32px"))
    ap.add_argument("--photo-run", default=str(ROOT / "runs" / "export-bench" / "fashion-224px-seed0"))
    ap.add_argument("--bentoml-home", default=str(ROOT / "runs" / "export-bench" / "bentoml"))
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "serve-v2"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "serving.md"))
    args = ap.parse_args()
    hey = shutil.which("hey")
    if not hey:
        sys.exit("serve_v2: needs hey (scripts/install_tools.sh installs it)")
    os.environ["BENTOML_HOME"] = args.bentoml_home
    work = Path(args.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    machine = Machine.this()
    images = bodies(work)
    results = {
        32: measure_size(hey, Path(args.small_run).resolve(), images["digit.png"][0], "image/png", work, args),
        224: measure_size(hey, Path(args.photo_run).resolve(), images["china.jpg"][0], "image/jpeg", work, args),
    }
    section = "\n".join(report(results, machine, args, images))
    print(section)
    write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
