"""Served throughput follows the compiler: one exported run served with ONNX Runtime fp32 and with the artifact
`--runtime auto` picks on this machine, side by side, at 64 concurrent clients; a section of docs/serving.md.

    BENTOML_HOME=runs/export-bench/bentoml python benchmarks/serve_artifacts.py \
        --run runs/export-bench/fashion-224px-seed0 [--requests 1500] [--concurrency 64]

The run must be exported (with the artifacts to choose from) and stored; benchmarks/export_formats.py leaves
its 224 px runs so. Each configuration is a real `transferkit serve` on 127.0.0.1 (default workers and
threads), sent the same real photo (scikit-learn's china.jpg, 640x427 JPEG) by `hey` (an httpx asyncio client
where hey is missing); the served artifact is read from the server's own log line ("picked ..."). Beside each
row: the artifact's batch-32 throughput in one process on this machine (from the manifest), the bound a server
can at best reach. Writes the section between the markers in docs/serving.md (appended when absent; serve_peers.py
keeps it when it rewrites the rest).
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from loadgen import BOUNDARY, run_client, run_hey  # noqa: E402
from provenance import commit, write_section  # noqa: E402

from transferkit.machine import Machine, load_average  # noqa: E402

BEGIN, END = "<!-- serve_artifacts: begin -->", "<!-- serve_artifacts: end -->"
CONFIGS = (("ONNX Runtime fp32", "onnx"), ("auto", "auto"))


def photo_body() -> bytes:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buf, format="JPEG", quality=90)
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="china.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + buf.getvalue()
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="an exported, stored run (BENTOML_HOME pointing at its store)")
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=180.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "serving.md"))
    args = ap.parse_args()

    import asyncio

    from transferkit.manifest import read_manifest
    from transferkit.serving import start_server

    run_dir = Path(args.run)
    manifest = read_manifest(run_dir / "export")
    machine, hey = Machine.this(), shutil.which("hey")
    body = photo_body()
    rows = []
    with tempfile.TemporaryDirectory(prefix="transferkit-serve-artifacts-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        for label, runtime in CONFIGS:
            load = load_average()
            with start_server(run_dir, runtime=runtime, log_path=Path(tmp) / f"{runtime}.log") as server:
                url = f"{server.url}/predict"
                asyncio.run(run_client(url, body, 64, 8, 60, "warm-up"))  # first calls allocate
                level = (
                    run_hey(hey, url, body_file, args.requests, args.concurrency, args.max_seconds, label)
                    if hey
                    else asyncio.run(run_client(url, body, args.requests, args.concurrency, args.max_seconds, label))
                )
                picked = re.search(r"picked (\S+?):", server.log_tail(200))
            artifact = picked.group(1) if picked else runtime
            entry = manifest.artifacts.get(artifact)
            bound = entry.speed_on(machine, "cpu") if entry else None
            rows.append((label, artifact, level, bound, load))
    base = rows[0][2].ok_rps
    lines = [
        BEGIN,
        "",
        f"### Served artifact at {manifest.image_size} px: ONNX Runtime fp32 vs what `auto` picks",
        "",
        f"`python benchmarks/serve_artifacts.py --run {run_dir}` at commit {commit()}, {machine.describe()}; "
        f"{args.requests} requests of a 640x427 JPEG at c={args.concurrency} from "
        f"{'`hey`' if hey else 'an httpx asyncio client (hey is not installed)'}; default workers and threads.",
        "",
        "| config | served artifact | req/s | vs ORT fp32 | p50 ms | p99 ms | answers | artifact img/s, batch 32, one "
        "process | req/s / that bound | load before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, artifact, level, bound, load in rows:
        p50, p99 = (f"{level.latencies[p] * 1000:.0f}" if p in level.latencies else "-" for p in (50, 99))
        b = f"{bound.images_per_second:,.0f}" if bound else "-"
        ratio = f"{level.ok_rps / bound.images_per_second:.2f}" if bound else "-"
        lines.append(
            f"| {label} | {artifact} | {level.ok_rps:,.1f} | {level.ok_rps / base:.2f}x | {p50} | {p99} | "
            f"{level.counts()} | {b} | {ratio} | {load} |"
        )
    lines += ["", END]
    section = "\n".join(lines)
    print(section)
    write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
