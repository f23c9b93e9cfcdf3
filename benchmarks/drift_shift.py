"""Drift detection on a real shift: a served model with capture on, real HTTP traffic first from its own domains,
then from a shifted one, and `transferkit drift` over windows of the captured rows. A section of docs/drift.md.

    BENTOML_HOME=runs/export-bench/bentoml python benchmarks/drift_shift.py --run runs/export-bench/demo-32px \
        [--in-domain 8000] [--shifted 2000] [--window 250]

The run (MNIST + Fashion-MNIST at 32 px) is served by `transferkit serve RUN --capture DIR --capture-rate 1`.
In-domain traffic: MNIST and Fashion-MNIST validation images (never the test images the reference is made of),
interleaved, each posted alone as a PNG at its native 28x28 by 16 clients. Shifted traffic: the same stream with
every MNIST image replaced by a scikit-learn UCI digit (8x8, scanned at another resolution and contrast): half the
traffic moves, the Fashion-MNIST half does not. `transferkit drift --window N` then judges each window of N
captured rows. Reported: false alarms (in-domain windows flagged, goal <= 5%), the first shifted window's verdict
and p-value, and the rows it needed (goal: flagged within 500 shifted requests at p < 0.01).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from provenance import command_line, commit, write_section  # noqa: E402

from transferkit.machine import Machine  # noqa: E402

BEGIN, END = "<!-- drift_shift: begin -->", "<!-- drift_shift: end -->"


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def streams(n_in: int, n_shift: int) -> tuple[list[bytes], list[bytes]]:
    from transferkit.data import builtin

    rng = np.random.default_rng(0)
    mnist = builtin.load_mnist()[0]["val"][0]
    fashion = builtin.load_fashion_mnist()[0]["val"][0]
    digits = builtin.load_digits()[0]
    uci = np.concatenate([digits[s][0] for s in ("train", "val", "test")])

    def interleave(a: np.ndarray, b: np.ndarray, n: int) -> list[bytes]:
        ia, ib = rng.choice(len(a), n // 2), rng.choice(len(b), n - n // 2)
        images = [a[i] for i in ia] + [b[i] for i in ib]
        order = rng.permutation(len(images))
        return [png(_as_28(images[i])) for i in order]

    return interleave(mnist, fashion, n_in), interleave(uci, fashion, n_shift)


def _as_28(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    image = np.squeeze(image)
    if image.shape != (28, 28):
        image = np.asarray(Image.fromarray(image).resize((28, 28), Image.BILINEAR))
    return image.astype(np.uint8)


def send(url: str, bodies: list[bytes], start: int) -> int:
    import httpx

    def one(i: int) -> int:
        r = httpx.post(
            url,
            content=bodies[i],
            headers={"Content-Type": "image/png", "X-Request-ID": f"{start + i:06d}"},
            timeout=30,
        )
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(len(bodies))))
    return sum(c != 200 for c in codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--in-domain", type=int, default=8000)
    parser.add_argument("--shifted", type=int, default=2000)
    parser.add_argument("--window", type=int, default=250)
    parser.add_argument("--out", default=str(ROOT / "docs" / "drift.md"))
    args = parser.parse_args()
    from transferkit.evaluation.drift import run_drift
    from transferkit.serving import start_server

    work = Path(tempfile.mkdtemp(prefix="drift-shift-"))
    folder = work / "capture"
    calm, moved = streams(args.in_domain, args.shifted)
    with start_server(args.run, capture_dir=str(folder), capture_rate=1.0, log_path=work / "serve.log") as server:
        bad = send(server.url + "/predict", calm, 0) + send(server.url + "/predict", moved, len(calm))
    report = run_drift(args.run, folder, window=args.window)
    windows = report["windows"]
    switch = args.in_domain // args.window  # windows before it hold only in-domain rows
    calm_w, moved_w = windows[:switch], windows[switch:]
    alarms = sum(w["drift"] for w in calm_w)
    first = moved_w[0] if moved_w else None
    lines = [
        BEGIN,
        "## Drift on a real shift (measured)",
        "",
        f"Command: `{command_line()}` at commit {commit()}. Machine: {Machine.this().describe()}. The run "
        f"`{Path(args.run).name}` served with `--capture-rate 1`; {args.in_domain} in-domain requests (MNIST + "
        f"Fashion-MNIST validation images), then {args.shifted} shifted ones (every MNIST image replaced by a "
        f"scikit-learn UCI digit, Fashion-MNIST unchanged: half the traffic moves), one image per request, 16 "
        f"clients; {bad} non-200 answers. `transferkit drift --window {args.window}`, alpha {report['alpha']}.",
        "",
        "| traffic | windows | flagged | p (smallest head), median | rows needed (first flagged window) |",
        "|---|---|---|---|---|",
        f"| in-domain | {len(calm_w)} | {alarms} ({alarms / max(len(calm_w), 1):.0%}; goal <= 5%) | "
        f"{_median_p(calm_w):.2g} | - |",
        f"| shifted | {len(moved_w)} | {sum(w['drift'] for w in moved_w)} | {_median_p(moved_w):.2g} | "
        f"{_needed(first)} (goal: flagged within 500 requests, p < 0.01) |",
        "",
        END,
    ]
    print("\n".join(lines))
    write_section(args.out, "\n".join(lines), BEGIN, END, new_file="# Drift\n")
    shutil.rmtree(work, ignore_errors=True)


def _median_p(windows: list[dict]) -> float:
    ps = [min(h["p"] for h in w["heads"].values()) for w in windows]
    return float(np.median(ps)) if ps else float("nan")


def _needed(window: dict | None) -> str:
    if window is None:
        return "-"
    needed = [h["needed"] for h in window["heads"].values() if h["needed"] is not None]
    return f"{min(needed)} rows" if needed else "not flagged"


if __name__ == "__main__":
    main()
