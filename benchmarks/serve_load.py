"""Serving under load: the bare runtime, a decode-only BentoML service and transferkit, side by side.

    python benchmarks/serve_load.py [--requests 2000] [--levels 1,16,64,256] [--sizes 32,64] [--run RUN] [--quick]

a. bare ONNX Runtime (images/s at batch 1/8/32/64) and the per-image decode, in-process: where time goes;
b. benchmarks/decode_only_service.py: one BentoML worker that decodes the upload and runs no model;
c. transferkit with batching on (max batch 32) and off (1), at the default worker count and with one worker.
Load from `hey` (an httpx asyncio client without it). A full run takes many minutes and loads every core:
run it on an otherwise idle machine. Prints the tables and writes docs/serving-load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from loadgen import BOUNDARY, CONTENT_TYPE, Level, batch_totals, run_client, run_hey, serving  # noqa: E402
from provenance import commit, write_report  # noqa: E402

HERE = Path(__file__).resolve().parent
DECODE_ONLY = "decode-only, 1 worker"


def decode_only_label(workers: int) -> str:
    return f"decode-only, {workers} workers"


CONFIGS = [("on", 32, None), ("on", 32, 1), ("off", 1, None), ("off", 1, 1)]  # batching, max batch, workers
INTRO = (
    "Each model is an ImageNet MobileNetV2 with two untrained 10-class heads (accuracy plays no part here), "
    "exported to ONNX and served by ONNX Runtime from a private BentoML store. Every request is POST /predict with "
    "one 28x28 PNG digit ({png} bytes) in the multipart field `image`. Load generator: {generator}. Per level: a "
    "short warm-up, then {requests} requests (rounded up to a multiple of the concurrency, at least 4 per "
    "connection; at most {cap:g} s). req/s counts 200 answers only; p50/p99 cover all answers, refusals included. "
    "The decode-only service (`benchmarks/decode_only_service.py`) is a one-worker `@bentoml.api` that decodes "
    'and resizes the upload and runs no model; "vs decode-only" divides by its req/s at the same concurrency. '
    "Mean batch: images per runtime call during the level (`transferkit_batch_size` on /metrics). The first "
    "table of each model is measured in-process, without HTTP."
)


class Model(NamedTuple):
    size: int
    tag: str
    onnx: Path
    preprocessing: dict


def label(batching: str, workers: int | None, default_workers: int) -> str:
    return f"transferkit batching {batching}, " + ("1 worker" if workers else f"default workers ({default_workers})")


FLOOD_QUEUE, FLOOD_CLIENTS = 16, (64, 256)  # a small per-worker budget under many clients: most are refused


def flood(model: Model, common: dict[str, str], tmp: Path, body_file: Path, hey: str, requests: int) -> list[str]:
    """Back-pressure: many clients against a small admission budget. Per-request rows from `hey -o csv` split
    the latency of refusals (503) from that of answers, which hey's summary mixes. hey is a closed loop: a
    refused client sends its next request at once, so this is a worst case for the refusal path."""
    env = {
        **common,
        "TRANSFERKIT_MODEL": model.tag,
        "TRANSFERKIT_MAX_QUEUE": str(FLOOD_QUEUE),
        "TRANSFERKIT_MAX_IMAGES": str(FLOOD_QUEUE),
    }
    lines = [
        f"## Back-pressure ({model.size} px model)",
        "",
        f"`TRANSFERKIT_MAX_QUEUE={FLOOD_QUEUE}` images per worker, default workers; `hey -o csv` gives the "
        "latency per status. After each flood, one client sends 20 requests.",
        "",
        "| clients | status | requests | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    notes = []
    with serving("transferkit.serving.service:TransferkitService", env, tmp / "flood.log") as base:
        for clients in FLOOD_CLIENTS:
            n = clients * max(4, -(-requests // clients))
            cmd = [
                hey,
                "-n",
                str(n),
                "-c",
                str(clients),
                "-m",
                "POST",
                "-t",
                "20",
                "-T",
                CONTENT_TYPE,
                "-D",
                str(body_file),
                "-o",
                "csv",
                f"{base}/predict",
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
            after = subprocess.run(
                [hey, "-n", "20", "-c", "1", "-m", "POST", "-T", CONTENT_TYPE, "-D", str(body_file), f"{base}/predict"],
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            by_status: dict[int, list[float]] = {}
            for row in out.splitlines()[1:]:
                cells = row.split(",")
                if len(cells) >= 7 and cells[6].isdigit():
                    by_status.setdefault(int(cells[6]), []).append(float(cells[0]))
            for code, lats in sorted(by_status.items()):
                p50, p99 = (float(np.percentile(lats, q)) * 1000 for q in (50, 99))
                lines.append(f"| {clients} | {code} | {len(lats)} | {p50:,.1f} | {p99:,.1f} |")
            recovered = re.findall(r"\[(\d+)\]\s+(\d+) responses", after)
            other = sum(len(v) for c, v in by_status.items() if c >= 500 and c != 503)
            notes.append(
                f"- {clients} clients: other 5xx {other}; afterwards "
                + (", ".join(f"{c}: {k}" for c, k in recovered) or "no answer")
            )
    return lines + ["", *notes, ""]


def make_run(run_dir: Path, size: int) -> Path:
    """A run dir with the training contract: ImageNet MobileNetV2 and two random 10-class heads."""
    import torch

    from transferkit.config import TrainConfig
    from transferkit.model import build_model
    from transferkit.runs import Labels, save_run_metadata

    fashion = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
    heads = {"digits": [str(i) for i in range(10)], "fashion-mnist": fashion}
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", "imagenet", heads, image_size=size)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_metadata(
        run_dir,
        TrainConfig(data=list(heads), image_size=size, weights="imagenet"),
        model.preprocessing,
        Labels(heads=heads, datasets={name: name for name in heads}, specs={name: name for name in heads}),
    )
    torch.save(model.state_dict(), run_dir / "model.pt")
    return run_dir


def model_of(run_dir: Path) -> Model:
    from transferkit.manifest import read_manifest

    manifest = read_manifest(run_dir / "export")
    onnx = manifest.artifacts.get("onnx")
    if not manifest.tag or onnx is None or not onnx.servable:
        raise SystemExit(f"{run_dir}: needs a verified ONNX export saved to the BentoML model store")
    return Model(manifest.image_size, manifest.tag, run_dir / "export" / onnx.file, manifest.preprocessing.to_dict())


def prepare_models(args: argparse.Namespace, tmp: Path, user_home: Path) -> list[Model]:
    if args.run:
        model = model_of(Path(args.run))
        name, version = model.tag.split(":")
        if not (user_home / "models" / name / version).is_dir():
            raise SystemExit(f"model {model.tag} is not in the BentoML store at {user_home}")
        # the servers read the private store: the model is copied there and the user's store stays untouched
        shutil.copytree(
            user_home / "models" / name / version, Path(os.environ["BENTOML_HOME"]) / "models" / name / version
        )
        return [model]
    from transferkit.export import export_run

    models = []
    for size in args.sizes:
        result = export_run(make_run(tmp / f"mobilenet-{size}px", size), formats=("onnx",), verify_images=64)
        if not result.ok:
            raise SystemExit(f"the export of the {size} px model failed: {result.formats}")
        models.append(model_of(result.run_dir))
        print(f"exported the {size} px model as {result.bentoml_tag}", file=sys.stderr, flush=True)
    return models


def rate(fn, items: int, repeats: int, target_s: float) -> float:
    """items/s of fn(): calls per repeat sized to take about target_s (from one call after a warm-up one),
    median over repeats."""
    from transferkit.machine import median_seconds

    calls = max(1, int(target_s / max(median_seconds(fn, 1, warmup=1), 1e-6)))

    def repeat() -> None:
        for _ in range(calls):
            fn()

    return calls * items / median_seconds(repeat, repeats, warmup=0)


def digit_upload() -> tuple[bytes, bytes]:
    """(a 28x28 PNG digit from scikit-learn's digits, the multipart body that uploads it in the field `image`):
    the request every serving benchmark sends."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = (load_digits().images[0] * (255 / 16)).astype(np.uint8)  # 8x8, 0..16 -> an MNIST-like 28x28
    Image.fromarray(digit, mode="L").resize((28, 28), Image.BILINEAR).save(out := io.BytesIO(), format="PNG")
    png = out.getvalue()
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="digit.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    return png, head.encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def bare(model: Model, png: bytes, quick: bool) -> tuple[dict[int, float], float]:
    import onnxruntime as ort

    from transferkit.preprocess import SERVED_FORMATS, Preprocessing, decode_image

    repeats, target = (3, 0.1) if quick else (5, 0.5)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(model.onnx), providers=providers)  # ORT's defaults: its best case
    runtime = {}
    for n in (1, 8, 32, 64):
        x = np.random.default_rng(0).standard_normal((n, 3, model.size, model.size), dtype=np.float32)
        runtime[n] = rate(lambda x=x: session.run(None, {"images": x}), n, repeats, target)
    pre = Preprocessing.from_dict(model.preprocessing)  # the server's own decode path
    return runtime, rate(lambda: pre.pil_to_uint8(decode_image(png, formats=SERVED_FORMATS)), 1, repeats, target)


def measure_size(
    model: Model, args, tmp: Path, body: bytes, body_file: Path, hey: str | None, default_workers: int
) -> list[Level]:
    def level(base: str, c: int, config: str, batches: bool) -> Level:
        url = f"{base}/predict"
        go = (
            (lambda n, cap: run_hey(hey, url, body_file, n, c, cap, config))
            if hey
            else (lambda n, cap: asyncio.run(run_client(url, body, n, c, cap, config)))
        )
        go(max(c, 50), 60)  # warm-up: connections, allocator, thread pools
        before = batch_totals(base) if batches else None
        result = go(c * max(4, -(-args.requests // c)), args.max_seconds)  # hey sends n // c per connection
        if before is not None:
            total, calls = (a - b for a, b in zip(batch_totals(base), before))
            result.mean_batch = total / calls if calls else None
        print(
            f"  {model.size} px | {config} | c={c}: {result.ok_rps:,.0f} req/s (200) | {result.counts()}",
            file=sys.stderr,
            flush=True,
        )
        return result

    common = serving_env()
    levels = []
    env = {**common, "DECODE_ONLY_IMAGE_SIZE": str(model.size)}
    with serving("decode_only_service:DecodeOnlyService", env, tmp / f"decode-{model.size}.log", cwd=HERE) as srv:
        levels += [level(srv, c, DECODE_ONLY, False) for c in args.levels]
    if default_workers > 1:  # the same yardstick at transferkit's worker count: what batching must hide
        env["DECODE_ONLY_WORKERS"] = str(default_workers)
        with serving(
            "decode_only_service:DecodeOnlyService", env, tmp / f"decode-{model.size}-dw.log", cwd=HERE
        ) as srv:
            levels += [level(srv, c, decode_only_label(default_workers), False) for c in args.levels]
    for batching, max_batch, workers in CONFIGS:
        knobs = {"TRANSFERKIT_MODEL": model.tag, "TRANSFERKIT_MAX_BATCH": str(max_batch)}
        knobs |= {"TRANSFERKIT_WORKERS": str(workers)} if workers else {}
        log = tmp / f"transferkit-{model.size}-{batching}-{workers or 'default'}.log"
        with serving("transferkit.serving.service:TransferkitService", {**common, **knobs}, log) as srv:
            levels += [level(srv, c, label(batching, workers, default_workers), True) for c in args.levels]
    return levels


def serving_env() -> dict[str, str]:
    """This process's environment minus every serving knob: only the knobs a level sets reach its server (a
    stray API key or worker count would change what is measured). BENTOML_HOME etc. were set in main."""
    from transferkit.serving.settings import API_KEY_FILE_ENV, PREFIX, ServingSettings

    stray = {PREFIX + f.name.upper() for f in fields(ServingSettings)} | {API_KEY_FILE_ENV}
    return {k: v for k, v in os.environ.items() if k not in stray}


def find(levels: list[Level], config: str, c: int = 64) -> Level | None:
    return next((lv for lv in levels if lv.config == config and lv.concurrency == c), None)


def size_section(model: Model, runtime: dict[int, float], decode: float, levels: list[Level], dw: int) -> list[str]:
    best = max(runtime, key=runtime.get)
    lines = [f"## {model.size} px model (`{model.tag}`)", "", "| stage (in-process) | images/s |", "|---|---|"]
    lines += [f"| ONNX Runtime, batch {n}{' (best)' if n == best else ''} | {r:,.0f} |" for n, r in runtime.items()]
    lines += [
        f"| decode: Pillow open + load + RGB + resize to {model.size} px, 1 thread | {decode:,.0f} |",
        "",
        "| configuration | concurrency | req/s | p50 ms | p99 ms | status counts | vs decode-only | mean batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {lv.concurrency: lv.ok_rps for lv in levels if lv.config == DECODE_ONLY}
    ms = {p: lambda lv, p=p: f"{lv.latencies[p] * 1000:,.1f}" if p in lv.latencies else "n/a" for p in (50, 99)}
    for lv in levels:
        ratio = f"{lv.ok_rps / base[lv.concurrency]:.2f}x" if base.get(lv.concurrency) else "n/a"
        batch = f"{lv.mean_batch:.1f}" if lv.mean_batch is not None else "-"
        lines.append(
            f"| {lv.config} | {lv.concurrency} | {lv.ok_rps:,.0f} | {ms[50](lv)} | {ms[99](lv)} | "
            f"{lv.counts()} | {ratio} | {batch} |"
        )
    for workers in (None, 1):
        on, off = (find(levels, label(b, workers, dw)) for b in ("on", "off"))
        if on and off and off.ok_rps:
            lines += [
                "",
                f"Batching on / off at c=64, {'1 worker' if workers else 'default workers'}: "
                f"**{on.ok_rps / off.ok_rps:.2f}x** ({on.ok_rps:,.0f} vs {off.ok_rps:,.0f} req/s)",
            ]
    return lines + [""]


def goals(by_size: dict[int, list[Level]], dw: int) -> list[str]:
    rows = ["| goal | scope | measured | met |", "|---|---|---|---|"]
    add = lambda goal, scope, measured, ok: rows.append(  # noqa: E731
        f"| {goal} | {scope} | {measured} | {'n/a' if ok is None else 'yes' if ok else '**no**'} |"
    )
    served = [lv for levels in by_size.values() for lv in levels if not lv.config.startswith("decode-only")]
    bad = sum(n for lv in served for code, n in lv.statuses.items() if code >= 500 and code != 503)
    add("0 non-503 5xx at every level", f"every transferkit level ({len(served)})", bad, bad == 0)
    for size, levels in by_size.items():
        base = find(levels, DECODE_ONLY)
        for workers in (None, 1):
            lv, scope = find(levels, label("on", workers, dw)), f"{size} px, {label('on', workers, dw)}, c=64"
            if lv is None:
                add("the c=64 goals", scope, "not measured", None)
                continue
            answered, refused = sum(lv.statuses.values()) + sum(lv.errors.values()), lv.statuses.get(503, 0)
            add(
                "<= 1% 503",
                scope,
                f"{refused / max(answered, 1):.2%} ({refused} of {answered})",
                refused <= 0.01 * answered,
            )
            base_rps, p99 = base.ok_rps if base else 0.0, lv.latencies.get(99, float("inf"))
            add(
                ">= 1.0x decode-only, 1 worker",
                scope,
                f"{lv.ok_rps / max(base_rps, 1e-9):.2f}x ({lv.ok_rps:,.0f} vs {base_rps:,.0f} req/s)",
                base_rps > 0 and lv.ok_rps >= base_rps,
            )
            add("p99 <= 0.5 s", scope, f"{p99:.3f} s", p99 <= 0.5)
            same = find(levels, decode_only_label(dw)) if workers is None and dw > 1 else None
            if same is not None and same.ok_rps:
                add(
                    "close to 1.0x decode-only at the same worker count",
                    scope,
                    f"{lv.ok_rps / same.ok_rps:.2f}x ({lv.ok_rps:,.0f} vs {same.ok_rps:,.0f} req/s)",
                    None,
                )
    for workers in (None, 1):
        on, off = (find(by_size.get(64, []), label(b, workers, dw)) for b in ("on", "off"))
        scope = f"64 px, {'1 worker' if workers else 'default workers'}, c=64"
        if on and off and off.ok_rps:
            add("batching on >= 1.5x off", scope, f"{on.ok_rps / off.ok_rps:.2f}x", on.ok_rps >= 1.5 * off.ok_rps)
        else:
            add("batching on >= 1.5x off", scope, "not measured", None)
    errors = sum(sum(lv.errors.values()) for lv in served)
    return rows + ["", f"Requests without any HTTP answer (reset, timeout) over all transferkit levels: {errors}."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 2000; --quick: 300)")
    ap.add_argument("--levels", default="1,16,64,256", help="concurrency levels")
    ap.add_argument("--sizes", default="32,64", help="image sizes of the models made here (ignored with --run)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer requests, c=64 only")
    ap.add_argument("--run", default=None, help="an exported run dir to serve instead of making models")
    ap.add_argument("--max-seconds", type=float, default=180.0, help="cap on one level's duration")
    ap.add_argument("--out", default="docs/serving-load.md")
    args = ap.parse_args()
    args.requests = args.requests or (300 if args.quick else 2000)
    args.levels = [64] if args.quick else [int(v) for v in args.levels.split(",")]
    args.sizes = [int(v) for v in args.sizes.split(",")]

    user_home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    tmp = Path(tempfile.mkdtemp(prefix="tk-serve-load-"))
    # set before bentoml is imported: models and servers use a private store, never the user's
    os.environ.update(BENTOML_HOME=str(tmp / "bentoml"), BENTOML_DO_NOT_TRACK="True", OMP_WAIT_POLICY="PASSIVE")

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every server's stop_tree

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    try:
        import bentoml
        import onnxruntime

        from transferkit.serving.settings import ServingSettings

        hey = shutil.which("hey")
        generator = (
            f"`hey` ({hey}), keep-alive connections"
            if hey
            else "a Python httpx asyncio client (hey is "
            "not installed; this client needs more CPU than hey, which it takes from the servers)"
        )
        defaults = ServingSettings()
        png, body = digit_upload()
        cpuinfo = Path("/proc/cpuinfo")
        cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
        (body_file := tmp / "body.multipart").write_bytes(body)
        print(f"load generator: {generator}", file=sys.stderr, flush=True)
        sections, by_size = [], {}
        for model in prepare_models(args, tmp, user_home):
            runtime, decode = bare(model, png, args.quick)
            by_size[model.size] = measure_size(model, args, tmp, body, body_file, hey, defaults.resolved_workers)
            sections += size_section(model, runtime, decode, by_size[model.size], defaults.resolved_workers)
            if hey and not args.quick and model.size == min(args.sizes):
                sections += flood(model, serving_env(), tmp, body_file, hey, args.requests)
        quick = " (`--quick` smoke run: c=64 only, few requests; not a result)" if args.quick else ""
        lines = [
            "# Serving under load: bare runtime, decode-only BentoML, transferkit",
            "",
            f"Produced by `{' '.join(['python', *sys.argv])}` at commit {commit()} on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC{quick}.",
            "",
            INTRO.format(png=len(png), generator=generator, requests=args.requests, cap=args.max_seconds),
            "",
            f"- machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"{cpu.group(1).strip() if cpu else platform.processor() or 'unknown CPU'}, {platform.platform()}",
            f"- transferkit: default {defaults.resolved_workers} workers x {defaults.resolved_threads} ONNX Runtime "
            f"threads, 1 worker x {ServingSettings(workers=1).resolved_threads} threads; batching on = max batch "
            f"32, off = 1; max wait {defaults.max_wait_ms:g} ms; max queue {defaults.max_queue} images per worker",
            f"- versions: bentoml {bentoml.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"Python {platform.python_version()}",
            "",
            *sections,
            "## Goals",
            "",
            *goals(by_size, defaults.resolved_workers),
            "",
        ]
        write_report(args.out, lines)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
