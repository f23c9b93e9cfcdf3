"""`make demo`: the main job end to end on built-in real data.

ImageNet-pretrained MobileNetV2 fine-tuned on MNIST + Fashion-MNIST together (one backbone, two heads) at
32 px, evaluated on both test sets, exported to ONNX and verified against PyTorch, served by BentoML on
127.0.0.1, queried with real test images, one corrupt file and a burst of concurrent clients, then stopped.
What it measured is written to docs/demo.md (with the machine and the commit), so that page is never copied by
hand: `python scripts/demo.py [--report PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from transferkit.config import TrainConfig
from transferkit.data import load_dataset
from transferkit.errors import TransferkitError
from transferkit.evaluation import evaluate_run
from transferkit.export import export_run, format_export_table
from transferkit.machine import Machine
from transferkit.preprocess import Preprocessing
from transferkit.serving import format_predictions, predict_files, start_server
from transferkit.training import train
from transferkit.utils import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from provenance import commit  # noqa: E402  (the commit every measured page names, "+changes" included)

RUN = Path("runs/demo")
GOALS = {"mnist": 0.95, "fashion-mnist": 0.85}


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def sample_images(run: Path) -> list[Path]:
    """Three real test images per dataset, written as PNG files a user would send."""
    out = run / "samples"
    out.mkdir(exist_ok=True)
    paths = []
    for name in GOALS:
        ds = load_dataset(name, Preprocessing(image_size=28))
        for i in np.random.default_rng(0).choice(len(ds.test), 3, replace=False):
            p = out / f"{name}-{i}-true-{ds.classes[ds.test.labels[i]].replace('/', '_')}.png"
            Image.fromarray(ds.test.images[i][..., 0], mode="L").save(p)
            paths.append(p)
    return paths


async def burst(url: str, image: bytes, clients: int) -> Counter:
    """`clients` requests at once, one connection each: HTTP status -> count."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        responses = await asyncio.gather(
            *(client.post(f"{url}/predict", files={"image": ("x.png", image)}) for _ in range(clients))
        )
    return Counter(r.status_code for r in responses)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default="docs/demo.md", help="where the measured page goes (default: docs/demo.md)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if RUN.exists():
        shutil.rmtree(RUN)
    banner("train: MobileNetV2 (ImageNet) on MNIST + Fashion-MNIST, 12,000 images each, 32 px")
    config = TrainConfig(data=list(GOALS), limit=12_000, epochs=4, image_size=32, batch_size=128, out=str(RUN))
    train(config)
    t_train = time.perf_counter()

    banner("eval: every head on every dataset (test split)")
    result = evaluate_run(RUN)
    print(result.table)
    accuracies = {d: c.accuracy for row in result.matrix.cells.values() for d, c in row.items() if c.own}

    banner("export: ONNX, verified against PyTorch")
    exported = export_run(RUN, formats=["onnx"])
    print(format_export_table(exported))
    if not exported.ok:
        raise TransferkitError("the ONNX export failed its accuracy gate; see runs/demo/export/verify.json")
    t_export = time.perf_counter()

    banner("serve: BentoML on 127.0.0.1, real test images and one corrupt file")
    images = sample_images(RUN)
    bad = RUN / "samples" / "corrupt.png"
    bad.write_bytes(images[0].read_bytes()[:60])
    with start_server(RUN) as server:
        print(f"server ready at {server.url}")
        print(format_predictions(predict_files(images, url=server.url, top_k=3)))
        r = httpx.post(f"{server.url}/predict", files={"image": ("corrupt.png", bad.read_bytes(), "image/png")})
        print(f"corrupt.png -> HTTP {r.status_code}: {r.text}")
        corrupt = f"{r.status_code} {r.text}"
        still = httpx.get(f"{server.url}/readyz").status_code
        print(f"server still ready after the bad upload: /readyz -> {still}")
        t_burst = time.perf_counter()
        codes = asyncio.run(burst(server.url, images[0].read_bytes(), 128))
        print(f"128 concurrent clients -> HTTP {dict(codes)} in {time.perf_counter() - t_burst:.2f}s")
    t_end = time.perf_counter()

    banner("summary")
    for name, goal in GOALS.items():
        verdict = "ok" if accuracies[name] >= goal else "BELOW GOAL"
        print(f"{name:15s} test accuracy {accuracies[name]:.4f}  (goal >= {goal:.2f}: {verdict})")
    print(
        f"time: train {t_train - t0:.0f}s, eval+export {t_export - t_train:.0f}s, serve {t_end - t_export:.0f}s, "
        f"total {t_end - t0:.0f}s"
    )
    print(f"run directory: {RUN}")
    times = {"train": t_train - t0, "eval+export": t_export - t_train, "serve": t_end - t_export, "total": t_end - t0}
    verification = exported.formats["onnx"].verification["heads"]
    write_report(Path(args.report), accuracies, times, verification, corrupt, still, dict(codes))
    print(f"report: {args.report}")
    served_all = set(codes) == {200}
    if not served_all:
        print(f"the concurrent burst was not answered in full: {dict(codes)}")
    return 0 if served_all and all(accuracies[n] >= g for n, g in GOALS.items()) else 1


def write_report(
    path: Path, accuracies: dict, times: dict, verification: dict, corrupt: str, still: int, burst_codes: dict
) -> None:
    """docs/demo.md, from this run's numbers only."""
    lines = [
        "# `make demo`: measured",
        "",
        f"Written by `scripts/demo.py` (`make demo` = setup + that script) on {time.strftime('%Y-%m-%d')}, commit "
        f"{commit()}. Machine: {Machine.this().describe()}.",
        "",
        "| step | time |",
        "|---|---|",
        f"| train: MobileNetV2 (ImageNet), MNIST + Fashion-MNIST, 12,000 train images each, 32 px, 4 epochs | "
        f"{times['train']:.0f} s |",
        f"| eval (both test sets) + ONNX export + verification | {times['eval+export']:.0f} s |",
        f"| serve: start, real test images, 1 corrupt file, 128 concurrent clients, stop | {times['serve']:.0f} s |",
        f"| **total after setup** | **{times['total']:.0f} s** |",
        "",
        "| dataset | test accuracy | goal |",
        "|---|---|---|",
        *(f"| {name} | {accuracies[name]:.2%} | >= {goal:.0%} |" for name, goal in GOALS.items()),
        "",
        "ONNX against PyTorch: "
        + ", ".join(
            f"max |Δlogit| {h['max_abs_diff']:.1e} and top-1 agreement {h['top1_agreement']:.1%} ({head} head)"
            for head, h in verification.items()
        )
        + ".",
        "",
        f"The corrupt upload was answered `{corrupt[:160]}`; `/readyz` answered {still} afterwards. 128 concurrent "
        f"clients: {burst_codes}.",
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TransferkitError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        sys.exit(2)
