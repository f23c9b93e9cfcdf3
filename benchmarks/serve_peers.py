"""Serving against the peers a user would deploy instead: transferkit, mosec and a plain batchable BentoML service,
each given the same ONNX file, the same image and the same workers, side by side; writes docs/serving.md.

    python benchmarks/serve_peers.py [--small-run runs/export-bench/demo-32px]
        [--photo-run runs/export-bench/fashion-224px-seed0] [--bentoml-home runs/export-bench/bentoml]
        [--seconds 8] [--workdir runs/serve-peers]

The runs must be exported and stored in `--bentoml-home` (benchmarks/export_formats.py leaves its runs so); a
64 px run for the batching comparison is trained and exported into `--workdir` when missing. The peers are
installed by this script in virtual environments of their own under `--workdir` (never into the project's):
mosec (its Rust HTTP front, Python workers, raw image body) and BentoML with a 30-line `@bentoml.api(batchable=
True)` service taking PIL images (benchmarks/peers/). Every server: 2 workers x 1 ONNX Runtime thread on this
2-core machine, its own batching with max batch 32, the same decode, resize, normalisation and top-5 answer.
Load: `hey` (required), keep-alive clients at c=64 and c=256 for `--seconds` each after a 2 s warm-up; req/s
counts 200 answers. At 224 px transferkit also serves the artifact `--runtime auto` picks on this machine, and
every 224 px row is compared with the bound of its artifact: cores / (decode + normalise + inference per image at
batch 32, one thread), measured in this process. The fast HTTP stack is measured on and off (off: uvloop and httptools
hidden from the workers, which then report asyncio and h11 on /metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(ROOT / "src"))

from loadgen import BOUNDARY, Level, run_hey  # noqa: E402
from provenance import command_line, commit, write_report  # noqa: E402

from transferkit.machine import Machine, load_average  # noqa: E402
from transferkit.serving.processes import die_with_parent, free_port, stop_tree  # noqa: E402

WORKERS, THREADS, MAX_BATCH = 2, 1, 32
LEVELS = (64, 256)
PEER_PACKAGES = {
    "mosec": ["mosec==0.9.8"],
    "bentoml": [f"bentoml=={metadata.version('bentoml')}"],  # the version transferkit serves with, used plainly
}


@dataclass
class Row:
    size: int
    server: str
    encoding: str
    level: Level
    load: str
    bound: float | None = None  # req/s the served artifact allows on these cores, when measured


def peer_python(workdir: Path, name: str) -> Path:
    """A venv of the peer's own, with the same numpy/Pillow/onnxruntime versions as the project's."""
    venv = workdir / "venvs" / name
    python = venv / "bin" / "python"
    same = [f"{p}=={metadata.version(p)}" for p in ("numpy", "pillow", "onnxruntime")]
    wanted = " ".join(PEER_PACKAGES[name] + same)
    stamp = venv / ".installed"
    if stamp.is_file() and stamp.read_text() == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted.split()], check=True)
    stamp.write_text(wanted)
    return python


def bodies(workdir: Path) -> dict[str, tuple[Path, Path, Path, str]]:
    """Per image: (the raw file, multipart bodies with the field `image` and `images`, its MIME type)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    digit = Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8), mode="L").resize((28, 28))
    out = {}
    for name, image, fmt, mime in (
        ("digit.png", digit, "PNG", "image/png"),
        ("china.jpg", Image.fromarray(load_sample_images().images[0]), "JPEG", "image/jpeg"),
    ):
        buf = io.BytesIO()
        image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        raw = workdir / name
        raw.write_bytes(buf.getvalue())
        out[name] = (
            raw,
            _multipart(workdir, name, mime, buf.getvalue(), "image"),
            _multipart(workdir, name, mime, buf.getvalue(), "images"),
            mime,
        )
    return out


def _multipart(workdir: Path, name: str, mime: str, data: bytes, field: str) -> Path:
    path = workdir / f"{name}.{field}.multipart"
    path.write_bytes(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: {mime}\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return path


def peer_config(run: Path, workdir: Path) -> str:
    from transferkit.manifest import read_manifest

    manifest = read_manifest(run / "export")
    pre = manifest.preprocessing.to_dict()
    return json.dumps(
        {
            "model": str(run / "export" / manifest.artifacts["onnx"].files[0]),
            "image_size": manifest.image_size,
            "mean": pre["mean"],
            "std": pre["std"],
            "heads": {h: list(c) for h, c in manifest.heads.items()},
            "max_batch": MAX_BATCH,
            "workers": WORKERS,
            "threads": THREADS,
        }
    )


@contextlib.contextmanager
def peer_server(kind: str, python: Path, config: str, log: Path, probe: tuple[Path, str]):
    """mosec or plain BentoML in its own venv on 127.0.0.1 -> the predict URL, once it answers a real request."""
    import httpx

    port = free_port()
    if kind == "mosec":
        argv = [str(python), "mosec_server.py", "--address", "127.0.0.1", "--port", str(port), "--timeout", "20000"]
        url = f"http://127.0.0.1:{port}/inference"
    else:
        argv = [
            str(python),
            "-m",
            "bentoml",
            "serve",
            "bentoml_service:Plain",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        url = f"http://127.0.0.1:{port}/predict"
    env = {**os.environ, "PEER_CONFIG": config, "BENTOML_HOME": str(log.parent / "peer-bentoml")}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=PEERS_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
    try:
        body, content_type = probe
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.post(
                        url, content=body.read_bytes(), headers={"content-type": content_type}, timeout=5
                    ).status_code
                    == 200
                ):
                    break
            time.sleep(0.5)
        yield url
    finally:
        stop_tree(proc, 15.0)


@contextlib.contextmanager
def transferkit_server(
    run: Path, log: Path, runtime: str = "onnx", max_batch: int = MAX_BATCH, fast_stack: bool = True
):
    from transferkit.serving import start_server

    hide = None
    if not fast_stack:  # an import that fails for uvloop and httptools: uvicorn's auto then picks asyncio and h11
        hide = Path(tempfile.mkdtemp(prefix="no-fast-stack-"))
        for module in ("uvloop", "httptools"):
            (hide / module).mkdir()
            (hide / module / "__init__.py").write_text(f"raise ImportError('{module} hidden by serve_peers.py')\n")
    old = os.environ.get("PYTHONPATH")
    if hide:
        os.environ["PYTHONPATH"] = str(hide) + (os.pathsep + old if old else "")
    try:
        with start_server(
            run, runtime=runtime, log_path=log, workers=WORKERS, threads=THREADS, max_batch=max_batch
        ) as server:
            yield server
    finally:
        if hide:
            os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
            shutil.rmtree(hide, ignore_errors=True)


def stack_of(url: str) -> str:
    import re

    import httpx

    found = re.search(r'transferkit_http_stack\{loop="([^"]+)",parser="([^"]+)"\}', httpx.get(url + "/metrics").text)
    return f"{found.group(1)}+{found.group(2)}" if found else "unknown"


def measure(hey: str, url: str, body: Path, content_type: str, seconds: float, label: str) -> list[tuple[Level, str]]:
    run_hey(hey, url, body, 0, 16, 30, "warm-up", content_type, seconds=2)
    out = []
    for c in LEVELS:
        load = load_average()
        out.append((run_hey(hey, url, body, 0, c, seconds + 60, label, content_type, seconds=seconds), load))
    return out


def artifact_bound(run: Path, artifact: str, image: Path, cores: int) -> float:
    """Requests/s the cores allow for this artifact: cores / (decode + normalise + inference per image), one
    thread each: the work the server cannot skip, without HTTP, queueing or batching."""
    import numpy as np

    from transferkit.machine import median_seconds
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.selection import load_runtime

    manifest = read_manifest(run / "export")
    pre = manifest.preprocessing
    data = image.read_bytes()
    decode = median_seconds(lambda: pre.decode_served(data), 50)  # as the server decodes it
    runtime = load_runtime(artifact, run / "export", manifest, threads=THREADS)
    pixels = np.stack([pre.decode_served(data)] * MAX_BATCH)
    normalise = median_seconds(lambda: pre.normalize_numpy(pixels), 10) / MAX_BATCH
    batch = pre.normalize_numpy(pixels)
    runtime.run(batch)
    infer = median_seconds(lambda: runtime.run(batch), 10) / MAX_BATCH
    return cores / (decode + normalise + infer)


def train_64px(workdir: Path) -> Path:
    """A 64 px run for batching on vs off (the model's accuracy plays no part), exported as ONNX and stored."""
    run = workdir / "fashion-64px"
    if not (run / "model.pt").is_file():
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "transferkit",
                "train",
                "--data",
                "fashion-mnist",
                "--image-size",
                "64",
                "--limit",
                "300",
                "--epochs",
                "1",
                "--out",
                str(run),
            ],
            check=True,
            cwd=ROOT,
        )
    # exported every time (seconds), so the model is in this run's store ($BENTOML_HOME), whichever that is
    subprocess.run([sys.executable, "-m", "transferkit", "export", str(run), "--format", "onnx"], check=True, cwd=ROOT)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-run", default=str(ROOT / "runs" / "export-bench" / "demo-32px"))
    ap.add_argument("--photo-run", default=str(ROOT / "runs" / "export-bench" / "fashion-224px-seed0"))
    ap.add_argument("--bentoml-home", default=str(ROOT / "runs" / "export-bench" / "bentoml"))
    ap.add_argument("--seconds", type=float, default=8.0, help="per level, after a 2 s warm-up")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "serve-peers"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "serving.md"))
    args = ap.parse_args()
    hey = shutil.which("hey")
    if not hey:
        sys.exit("serve_peers: needs hey (scripts/install_tools.sh installs it)")
    os.environ["BENTOML_HOME"] = args.bentoml_home
    work = Path(args.workdir).resolve()  # the peers start in benchmarks/peers/
    (work / "logs").mkdir(parents=True, exist_ok=True)
    machine = Machine.this()
    pythons = {name: peer_python(work, name) for name in PEER_PACKAGES}
    images = bodies(work)
    small, photo, mid = Path(args.small_run).resolve(), Path(args.photo_run).resolve(), train_64px(work)
    rows: list[Row] = []

    def add(size: int, server: str, encoding: str, results: list[tuple[Level, str]], bound: float | None = None):
        rows.extend(Row(size, server, encoding, level, load, bound) for level, load in results)
        for level, _ in results:
            print(
                f"{size} px | {server} | {encoding} | c={level.concurrency} | {level.ok_rps:,.0f} req/s | "
                f"{level.counts()}",
                flush=True,
            )

    logs = work / "logs"
    for size, run, image in ((32, small, "digit.png"), (224, photo, "china.jpg")):
        raw, form_image, form_images, mime = images[image]
        config = peer_config(run, work)
        with peer_server("mosec", pythons["mosec"], config, logs / f"mosec-{size}.log", (raw, mime)) as url:
            add(size, "mosec", "raw body", measure(hey, url, raw, mime, args.seconds, "mosec"))
        multipart = f"multipart/form-data; boundary={BOUNDARY}"
        with peer_server(
            "bentoml", pythons["bentoml"], config, logs / f"plain-{size}.log", (form_images, multipart)
        ) as url:
            add(
                size,
                "plain BentoML (batchable API)",
                "multipart",
                measure(hey, url, form_images, multipart, args.seconds, "plain"),
            )
        runtimes = ["onnx"] + (["auto"] if size == 224 else [])
        for runtime in runtimes:
            with transferkit_server(run, logs / f"transferkit-{size}-{runtime}.log", runtime=runtime) as server:
                artifact = (
                    server.log_tail(200).split("picked ", 1)[-1].split(":", 1)[0] if runtime == "auto" else "onnx"
                )
                name = f"transferkit ({artifact}{', auto' if runtime == 'auto' else ''}, {stack_of(server.url)})"
                measured = [("raw body", measure(hey, server.url + "/predict", raw, mime, args.seconds, name))]
                if runtime == "onnx":
                    measured.append(
                        ("multipart", measure(hey, server.url + "/predict", form_image, multipart, args.seconds, name))
                    )
            # the bound is measured with the server stopped: nothing else runs on the cores
            bound = artifact_bound(run, artifact, raw, WORKERS * THREADS) if size == 224 else None
            for encoding, results in measured:
                add(size, name, encoding, results, bound)
        if size == 32:
            with transferkit_server(run, logs / "transferkit-32-slow-stack.log", fast_stack=False) as server:
                name = f"transferkit (onnx, {stack_of(server.url)}: fast stack off)"
                add(size, name, "raw body", measure(hey, server.url + "/predict", raw, mime, args.seconds, name))
    raw, _, _, mime = images["digit.png"]
    for max_batch in (32, 1):
        with transferkit_server(mid, logs / f"transferkit-64-batch{max_batch}.log", max_batch=max_batch) as server:
            name = f"transferkit (onnx), max batch {max_batch}"
            load = load_average()
            run_hey(hey, server.url + "/predict", raw, 0, 16, 30, "warm-up", mime, seconds=2)
            add(
                64,
                name,
                "raw body",
                [
                    (
                        run_hey(
                            hey,
                            server.url + "/predict",
                            raw,
                            0,
                            64,
                            args.seconds + 60,
                            name,
                            mime,
                            seconds=args.seconds,
                        ),
                        load,
                    )
                ],
            )
    lines = report(rows, machine, args, images)
    previous = Path(args.out).read_text() if Path(args.out).exists() else ""
    for name in ("serve_v2.py", "serve_artifacts"):  # sections other benchmarks measured apart: kept as they were
        begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
        if begin in previous and end in previous:
            lines += ["", begin + previous.split(begin, 1)[1].split(end, 1)[0] + end]
    write_report(args.out, lines)


def _ms(level: Level, p: int) -> str:
    return f"{level.latencies[p] * 1000:.0f}" if p in level.latencies else "-"


def report(rows: list[Row], machine: Machine, args: argparse.Namespace, images: dict) -> list[str]:
    command = command_line()
    png, jpg = (images[n][0].stat().st_size for n in ("digit.png", "china.jpg"))
    lines = [
        "# Serving against the peers: transferkit, mosec, plain BentoML",
        "",
        f"Command: `{command.strip()}` at commit {commit()}. Machine: {machine.describe()}.",
        "",
        f"Every server: the same ONNX file, {WORKERS} workers x {THREADS} ONNX Runtime thread, its own batching (max "
        f"batch {MAX_BATCH}), the same decode/resize/normalise and top-5 answer per head. Peers run from venvs of "
        f"their own (benchmarks/peers/): mosec {PEER_PACKAGES['mosec'][0].split('==')[1]} takes the raw image as the "
        "body (its native ingress); plain BentoML is a `@bentoml.api(batchable=True)` taking PIL images (multipart "
        f"field `images`). Images: a {png}-byte 28x28 PNG digit at 32 and 64 px, scikit-learn's 640x427 china.jpg "
        f"({jpg:,} bytes, quality 90) at 224 px. Load: `hey`, keep-alive clients, {args.seconds:g} s per level after a "
        "2 s warm-up; req/s counts 200 answers; p50/p99 over all answers. `transferkit (X, loop+parser)`: the served "
        "artifact and the HTTP stack each worker reports on /metrics. Bound (224 px): cores / (decode + normalise + "
        f"inference per image at batch {MAX_BATCH}, one thread) for the row's artifact, measured in one process "
        "with the servers stopped.",
    ]
    mosec = {(r.size, r.level.concurrency): r.level for r in rows if r.server == "mosec"}
    for size in sorted({r.size for r in rows}):
        lines += [
            "",
            f"## {size} px",
            "",
            "| server | body | clients | req/s | vs mosec | p50 ms | p99 ms | answers | "
            "bound req/s | vs bound | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r.size == size):
            peer = mosec.get((size, r.level.concurrency))
            vs = f"{r.level.ok_rps / peer.ok_rps:.2f}x" if peer and peer.ok_rps else "-"
            bound = f"{r.bound:,.0f}" if r.bound else "-"
            vs_bound = f"{r.level.ok_rps / r.bound:.2f}" if r.bound else "-"
            lines.append(
                f"| {r.server} | {r.encoding} | {r.level.concurrency} | {r.level.ok_rps:,.0f} | {vs} | "
                f"{_ms(r.level, 50)} | {_ms(r.level, 99)} | {r.level.counts()} | {bound} | {vs_bound} | "
                f"{r.load} |"
            )
    lines += ["", "## Goals (same run)", "", *goal_lines(rows, mosec)]
    return lines


def goal_lines(rows: list[Row], mosec: dict) -> list[str]:
    def ours(size: int, c: int, where) -> Row | None:
        found = [r for r in rows if r.size == size and r.level.concurrency == c and where(r)]
        return max(found, key=lambda r: r.level.ok_rps, default=None)

    fast = lambda r: r.server.startswith("transferkit") and "fast stack off" not in r.server  # noqa: E731
    out = []
    for c in LEVELS:
        best, peer = ours(32, c, fast), mosec.get((32, c))
        if best and peer:
            out.append(
                f"- 32 px, c={c}: transferkit {best.level.ok_rps:,.0f} req/s ({best.encoding}) vs mosec "
                f"{peer.ok_rps:,.0f}: **{best.level.ok_rps / peer.ok_rps:.2f}x** (goal >= 1.0x)"
            )
        auto, peer = ours(224, c, lambda r: "auto" in r.server), mosec.get((224, c))
        if auto and peer:
            out.append(
                f"- 224 px, c={c}: transferkit `auto` {auto.level.ok_rps:,.0f} req/s vs mosec {peer.ok_rps:,.0f}: "
                f"**{auto.level.ok_rps / peer.ok_rps:.2f}x** (goal >= 1.2x); vs its artifact's bound "
                f"{auto.bound:,.0f}: **{auto.level.ok_rps / auto.bound:.2f}** (goal >= 0.9)"
            )
    for size in (32, 224):
        mine = ours(size, 64, (lambda r: "auto" in r.server) if size == 224 else fast)
        peer = mosec.get((size, 64))
        if mine and peer and 99 in mine.level.latencies and 99 in peer.latencies:
            out.append(
                f"- p99 at c=64, {size} px: transferkit {_ms(mine.level, 99)} ms vs mosec {_ms(peer, 99)} ms "
                "(goal: no worse)"
            )
    bad = sum(
        n
        for r in rows
        if r.server.startswith("transferkit")
        for code, n in r.level.statuses.items()
        if code not in (200, 503)
    )
    lost = sum(sum(r.level.errors.values()) for r in rows if r.server.startswith("transferkit"))
    out.append(f"- transferkit answers other than 200/503: {bad}; requests without an answer: {lost} (goal: 0)")
    on, off = (ours(64, 64, lambda r, m=m: r.server.endswith(f"max batch {m}")) for m in (32, 1))
    if on and off and off.level.ok_rps:
        out.append(
            f"- batching on vs off at 64 px, c=64: {on.level.ok_rps:,.0f} vs {off.level.ok_rps:,.0f} req/s: "
            f"**{on.level.ok_rps / off.level.ok_rps:.2f}x** (goal >= 1.5x)"
        )
    for c in LEVELS:
        slow = ours(32, c, lambda r: "fast stack off" in r.server)
        same = ours(32, c, lambda r: fast(r) and r.encoding == "raw body")
        if slow and same and slow.level.ok_rps:
            out.append(
                f"- fast HTTP stack (uvloop + httptools) on vs off, 32 px raw body, c={c}: "
                f"{same.level.ok_rps:,.0f} vs {slow.level.ok_rps:,.0f} req/s ({same.level.ok_rps / slow.level.ok_rps:.2f}x)"
            )
    return out


if __name__ == "__main__":
    main()
