"""The container image, measured in one run: build time (cold and warm), size, start and stop, and load at c=64
inside the container against the bare `transferkit serve` of the same run with the same worker count.

    python benchmarks/docker_image.py [--run RUN] [--base-image IMAGE] [--workers N] [--requests 4096] [--rounds 3]

Without --run the model is made as benchmarks/serve_load.py makes it (ImageNet MobileNetV2, two untrained 10-class
heads, 32 px, exported to ONNX and verified). Everything goes to a private BentoML store; every container, image
and server started here is removed at the end. Needs a Docker engine (`/work/shared/tools/docker-setup.sh` makes
one and the local base image) and `hey` (else an httpx asyncio client). Prints the tables and writes
docs/docker.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from loadgen import BOUNDARY, Level, run_client, run_hey
from provenance import commit, write_report
from serve_load import digit_upload, prepare_models, serving_env

LOCAL_BASE_IMAGE = "transferkit-base:bookworm"  # what docker-setup.sh builds where no registry is reachable
CLIENTS = 64
RUNTIME = "onnxruntime"  # the runtime built into the image


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def image_bytes(image: str) -> int:
    return int(json.loads(docker("image", "inspect", image).stdout)[0]["Size"])


def fresh_base(base: str, mark: str) -> str:
    """The base image under a new image ID: one label, no new layer, the same files. Docker's layer cache is
    keyed by the parent image's ID, so no layer cached on `base` (by earlier builds of any image) can be reused:
    the build that starts from it is cold. The legacy builder, as `transferkit build` uses it without buildx."""
    tag = f"transferkit-bench-base:{mark}"
    dockerfile = f"FROM {base}\nLABEL transferkit.benchmark={mark}\n"
    subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        input=dockerfile,
        text=True,
        check=True,
        capture_output=True,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        timeout=120,
    )
    return tag


def timed_build(run_dir: Path, base: str, image: str, log_path: Path) -> dict[str, float]:
    """`transferkit build RUN --image IMAGE --base-image BASE` as a user runs it -> seconds: total, and the split
    at the first line of the docker build (`bentoml build` with its requirement lock before it, the image after)."""
    cmd = [
        sys.executable,
        "-m",
        "transferkit",
        "build",
        str(run_dir),
        "--image",
        image,
        "--base-image",
        base,
        "--runtime",
        RUNTIME,
    ]
    start, split = time.monotonic(), None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for line in proc.stdout:
            log.write(line)
            if split is None and re.search(r"Sending build context|Step 1/\d+ : FROM", line):
                split = time.monotonic()
        code = proc.wait()
    total = time.monotonic() - start
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {code}):\n{tail}")
    cached = len(re.findall(r"---> Using cache", log_path.read_text(errors="replace")))
    steps = len(re.findall(r"^.*Step \d+/\d+ :", log_path.read_text(errors="replace"), re.M))
    bento = (split - start) if split else float("nan")
    return {"total": total, "bento": bento, "docker": total - bento, "cached": cached, "steps": steps}


class Containers:
    """Containers started here, by id, so that exactly those are removed at the end."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def run(self, image: str, port: int, env: dict[str, str]) -> tuple[str, float]:
        """`docker run -d` -> (container id, seconds from the command to the first /readyz 200)."""
        import httpx

        flags = [f for k, v in env.items() for f in ("-e", f"{k}={v}")]
        start = time.monotonic()
        cid = docker("run", "-d", "-p", f"127.0.0.1:{port}:3000", *flags, image).stdout.strip()
        self.ids.append(cid)
        url = f"http://127.0.0.1:{port}/readyz"
        while time.monotonic() - start < 180:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return cid, time.monotonic() - start
            if docker("inspect", "-f", "{{.State.Running}}", cid).stdout.strip() != "true":
                break
            time.sleep(0.1)
        logs = docker("logs", cid, check=False).stderr[-3000:]
        raise SystemExit(f"container {cid[:12]} did not become ready:\n{logs}")

    def stop(self, cid: str) -> tuple[float, int]:
        """`docker stop` (SIGTERM, SIGKILL after 10 s) -> (seconds, the container's exit code)."""
        start = time.monotonic()
        docker("stop", cid, timeout=60)
        seconds = time.monotonic() - start
        return seconds, int(docker("inspect", "-f", "{{.State.ExitCode}}", cid).stdout.strip())

    def remove_all(self) -> None:
        for cid in self.ids:
            docker("rm", "-f", cid, check=False)


def busy_share(seconds: float = 2.0) -> float:
    """Share of all CPUs busy over `seconds` (/proc/stat). Sampled while this run's servers are idle, it is the
    other work on the machine, which the load levels then share the cores with."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # guest time is already in user time
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def load(url: str, body: bytes, body_file: Path, hey: str | None, requests: int, cap: float, config: str) -> Level:
    go = (
        (lambda n: run_hey(hey, url, body_file, n, CLIENTS, cap, config))
        if hey
        else (lambda n: asyncio.run(run_client(url, body, n, CLIENTS, cap, config)))
    )
    go(CLIENTS * 4)  # warm-up: connections, allocator, thread pools
    level = go(CLIENTS * max(4, -(-requests // CLIENTS)))
    print(f"  {config}: {level.ok_rps:,.0f} req/s (200) | {level.counts()}", file=sys.stderr, flush=True)
    return level


def ms(level: Level, p: int) -> str:
    return f"{level.latencies[p] * 1000:,.0f}" if p in level.latencies else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="an exported run dir (default: make one as serve_load.py does)")
    ap.add_argument(
        "--base-image", default=None, help=f"default: {LOCAL_BASE_IMAGE} when present, else transferkit's default"
    )
    ap.add_argument("--workers", type=int, default=None, help="serving workers, both servers (default: serve's)")
    ap.add_argument("--requests", type=int, default=4096, help="requests per load level (c=64)")
    ap.add_argument("--rounds", type=int, default=3, help="load rounds, alternating container and bare server")
    ap.add_argument("--starts", type=int, default=3, help="extra docker run -> ready -> docker stop cycles")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="cap on one load level's duration")
    ap.add_argument("--out", default="docs/docker.md")
    args = ap.parse_args()
    args.sizes = [32]  # for serve_load's prepare_models

    user_home = Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml")
    tmp = Path(tempfile.mkdtemp(prefix="tk-docker-bench-"))
    # set before bentoml is imported: the model, the Bentos and the bare server use a private store. An empty uv
    # cache makes the cold build's requirement lock cold too; the warm build then finds it filled.
    os.environ.update(
        BENTOML_HOME=str(tmp / "bentoml"),
        BENTOML_DO_NOT_TRACK="True",
        OMP_WAIT_POLICY="PASSIVE",
        UV_CACHE_DIR=str(tmp / "uv-cache"),
    )
    for stray in set(os.environ) - set(serving_env()):  # only the knobs set here reach either server
        del os.environ[stray]

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the cleanup below

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    mark = uuid.uuid4().hex[:10]
    images = [f"transferkit-bench:cold-{mark}", f"transferkit-bench:warm-{mark}"]
    containers, base_copy = Containers(), None
    load_before = os.getloadavg()
    try:
        import bentoml
        import onnxruntime

        from transferkit.serving import start_server
        from transferkit.serving.build import DEFAULT_BASE_IMAGE, check_docker
        from transferkit.serving.processes import free_port
        from transferkit.serving.settings import ServingSettings

        buildx = check_docker()
        base = args.base_image or (
            LOCAL_BASE_IMAGE
            if docker("image", "inspect", LOCAL_BASE_IMAGE, check=False).returncode == 0
            else DEFAULT_BASE_IMAGE
        )
        if docker("image", "inspect", base, check=False).returncode != 0:
            docker("pull", base, timeout=600)
        workers = args.workers or ServingSettings().resolved_workers
        threads = ServingSettings(workers=workers).resolved_threads
        hey = shutil.which("hey")
        generator = f"`hey` ({hey})" if hey else "a Python httpx asyncio client (hey is not installed)"

        model = prepare_models(args, tmp, user_home)[0]
        run_dir = model.onnx.parent.parent  # RUN/export/model.onnx

        base_copy = fresh_base(base, mark)
        print(f"cold build from {base} (as {base_copy}) ...", file=sys.stderr, flush=True)
        cold_busy = busy_share()
        cold = timed_build(run_dir, base_copy, images[0], tmp / "build-cold.log")
        print(f"  cold: {cold['total']:.1f}s; warm build ...", file=sys.stderr, flush=True)
        warm_busy = busy_share()
        warm = timed_build(run_dir, base_copy, images[1], tmp / "build-warm.log")
        print(f"  warm: {warm['total']:.1f}s", file=sys.stderr, flush=True)
        size, base_size = image_bytes(images[1]), image_bytes(base)
        image = images[1]
        inside = docker(
            "run",
            "--rm",
            "--entrypoint",
            "/app/.venv/bin/python",
            image,
            "-c",
            "import platform, bentoml, onnxruntime, numpy, PIL; print(f'bentoml {bentoml.__version__}, "
            "onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, Pillow {PIL.__version__}, "
            "Python {platform.python_version()}')",
        ).stdout.strip()

        env = {"TRANSFERKIT_WORKERS": str(workers)}
        starts, stops = [], []
        for _ in range(args.starts):
            cid, ready = containers.run(image, free_port(), env)
            starts.append(ready)
            stops.append(containers.stop(cid))
            print(
                f"  docker run -> ready {ready:.1f}s, docker stop {stops[-1][0]:.1f}s exit {stops[-1][1]}",
                file=sys.stderr,
                flush=True,
            )

        png, body = digit_upload()
        (body_file := tmp / "body.multipart").write_bytes(body)

        container_label, bare_label = "container (docker run -p 127.0.0.1:...)", "bare `transferkit serve`"
        levels: list[Level] = []
        busy: list[float] = []  # per level: CPU busy share just before it, this run's servers idle
        start = time.monotonic()
        with start_server(run_dir, port=None, log_path=tmp / "serve.log", workers=workers) as server:
            bare_ready = time.monotonic() - start
            cid, ready = containers.run(image, (port := free_port()), env)
            starts.append(ready)
            for r in range(args.rounds):  # alternating, so drift on the shared machine hits both alike
                for url, which in ((f"http://127.0.0.1:{port}", container_label), (server.url, bare_label)):
                    busy.append(busy_share())
                    levels.append(
                        load(
                            f"{url}/predict",
                            body,
                            body_file,
                            hey,
                            args.requests,
                            args.max_seconds,
                            f"{which}, round {r + 1}",
                        )
                    )
            stops.append(containers.stop(cid))
        tally = {}
        for which in (container_label, bare_label):
            mine = [lv for lv in levels if lv.config.startswith(which)]
            tally[which] = statistics.mean(lv.ok_rps for lv in mine)
        bad = sum(n for lv in levels for code, n in lv.statuses.items() if code != 200)
        dropped = sum(sum(lv.errors.values()) for lv in levels)

        cpuinfo = Path("/proc/cpuinfo")
        cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else None
        engine = docker("version", "-f", "{{.Server.Version}}").stdout.strip()
        n = CLIENTS * max(4, -(-args.requests // CLIENTS))
        hey_cmd = (
            f"`hey -n {n} -c {CLIENTS} -m POST -t 20 -T 'multipart/form-data; boundary={BOUNDARY}' -D body URL/predict`"
            if hey
            else "the httpx client"
        )
        med = statistics.median
        stop_codes = sorted({code for _, code in stops})
        summary = [
            "| measure | value |",
            "|---|---|",
            f"| image build, cold | **{cold['total']:.1f} s** (`bentoml build` {cold['bento']:.1f} s + docker build "
            f"{cold['docker']:.1f} s; {cold['cached']} of {cold['steps']} steps from cache; other work before: "
            f"{cold_busy:.0%}) |",
            f"| image build, warm | **{warm['total']:.1f} s** (`bentoml build` {warm['bento']:.1f} s + docker build "
            f"{warm['docker']:.1f} s; {warm['cached']} of {warm['steps']} steps from cache; other work before: "
            f"{warm_busy:.0%}) |",
            f"| image size, {RUNTIME} runtime | **{size / 1e6:,.0f} MB** (base image {base_size / 1e6:,.0f} MB, "
            f"so {(size - base_size) / 1e6:,.0f} MB added) |",
            f"| `docker run` -> /readyz 200 | **{med(starts):.1f} s** median of {len(starts)} "
            f"({', '.join(f'{s:.1f}' for s in starts)}) |",
            f"| `transferkit serve` -> /readyz 200 (bare, same run) | {bare_ready:.1f} s |",
            f"| `docker stop` | **{med(s for s, _ in stops):.1f} s** median of {len(stops)} "
            f"({', '.join(f'{s:.1f}' for s, _ in stops)}; the last one right after the load), exit code "
            f"{', '.join(map(str, stop_codes))} |",
        ]
        load_rows = [
            "| server, c=64 | req/s (200) | p50 ms | p99 ms | status counts | other work before |",
            "|---|---|---|---|---|---|",
        ]
        load_rows += [
            f"| {lv.config} | {lv.ok_rps:,.0f} | {ms(lv, 50)} | {ms(lv, 99)} | {lv.counts()} | {b:.0%} |"
            for lv, b in zip(levels, busy)
        ]
        ratio = tally[container_label] / tally[bare_label] if tally[bare_label] else float("nan")
        lines = [
            "# The container image: build, size, start, stop, load",
            "",
            f"Produced by `{' '.join(['python', *sys.argv])}` at commit {commit()} on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
            "",
            f"The run: `{model.tag}`, "
            + (
                "the exported run given with `--run`"
                if args.run
                else "ImageNet MobileNetV2 with two untrained 10-class heads at 32 px, exported to ONNX and verified, as "
                "`benchmarks/serve_load.py` makes it (accuracy plays no part here)"
            )
            + f". The image: "
            f"`transferkit build RUN --image TAG --base-image {base} --runtime {RUNTIME}`, "
            + (
                "BuildKit (buildx)."
                if buildx
                else "the legacy builder (`DOCKER_BUILDKIT=0`: the docker client here has no buildx)."
            ),
            "",
            f"- machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"{cpu.group(1).strip() if cpu else platform.processor() or 'unknown CPU'}, {platform.platform()}; "
            f"Docker engine {engine}. The container has no CPU or memory limit: it runs on the same cores as the "
            "bare server, and the load generator shares them with both. Load average right before the run "
            f"(1/5/15 min): {' / '.join(f'{v:.1f}' for v in load_before)}, before any of its own work: other work "
            "on the machine shows here.",
            f"- versions in the image: {inside}; on the host (the bare server): bentoml {bentoml.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}",
            "",
            "## Summary",
            "",
            *summary,
            "",
            "**Cold** means: the base image is present locally (nothing is pulled), but under a fresh image ID (a "
            "copy with one extra label and no new layer, made just before), so Docker has no cached layer to "
            "build on; the Bento store has no Bento of this run and uv's cache is empty, so `bentoml build` locks "
            "the requirements against the package index from scratch; pip inside the image runs with "
            "`--no-cache-dir`, so every wheel (BentoML, ONNX Runtime, numpy, Pillow, ... and their dependencies) "
            "is downloaded from the package index during the build. **Warm** is the same command right after: a "
            "new Bento (a new version, the uv cache filled), and Docker reuses every layer up to the one that "
            "copies the Bento, which changes with each Bento version. Each build time is the wall time of the "
            '`transferkit build` command, split at the docker build\'s first output line. "Other work before" '
            "here and below: the share of the CPUs busy in the 2 s before, while nothing of this run was working "
            "(its servers, when up, idle): what else on the machine the measurement shared the cores with.",
            "",
            f"## Load at {CLIENTS} concurrent clients",
            "",
            f"Both servers serve the same run with {workers} workers x {threads} ONNX Runtime threads "
            f"(`TRANSFERKIT_WORKERS={workers}`: `docker run -e` for the container, `--workers` for the bare "
            f"server), other settings at their defaults, no API key. Each request is POST /predict with one 28x28 "
            f"PNG digit from scikit-learn's digits ({len(png)} bytes) in the multipart field `image`. Load "
            f"generator: {generator}, on the host: {hey_cmd}, after a warm-up of {CLIENTS * 4} requests; at most "
            f"{args.max_seconds:g} s per level. The container is reached through its port published on 127.0.0.1, "
            "as a client on this machine reaches it: through Docker's userland proxy (`docker-proxy`), one more "
            "process on the same cores. req/s counts 200 answers; p50/p99 cover all answers.",
            "",
            *load_rows,
            "",
            f"Container / bare, mean over the rounds: **{ratio:.2f}x** ({tally[container_label]:,.0f} vs "
            f"{tally[bare_label]:,.0f} req/s). Answers other than 200: {bad}; requests without any HTTP answer "
            f"(reset, timeout): {dropped}.",
            "",
        ]
        write_report(args.out, lines)
    finally:
        containers.remove_all()
        for image in images:
            docker("image", "rm", "-f", image, check=False)
        if base_copy:
            docker("image", "rm", base_copy, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
