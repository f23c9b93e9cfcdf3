"""Hostile clients against a real server while a normal client is measured: what each attack costs the others.
Prints a table and writes docs/security_attacks.md (docs/security.md quotes it) with the command and commit.

    python benchmarks/attacks.py --run RUN [--attackers 8] [--seconds 10] [--workers 2]
        [--before-src OLD_CHECKOUT/src] [--out docs/security_attacks.md]

RUN: an exported run (a 32 px model, as the attacks were first measured on; `make demo` makes runs/demo). For
each attack of tests/serving/hostile.py, `--attackers` threads send it back to back for `--seconds` while a
normal client posts a real 32x32 PNG every 50 ms and probes /readyz between; the same normal client alone
first gives the unloaded figures. Per attack: what the attackers were answered, the normal client's p50, p99
and worst latency and its p99 over the unloaded p99 (goal: at most 2x), 5xx answers to anyone, worker
restarts, and the server's peak resident memory (all its processes) against the pod's limit in the
Kubernetes manifests. `--before-src` also runs the same attacks against another checkout's server (its
`src` folder as the server's PYTHONPATH: its own command line and defaults), for a before/after table from
one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loadgen import run_hey  # noqa: E402
from provenance import command_line, commit, write_report  # noqa: E402

from tests.serving import hostile  # noqa: E402
from transferkit.machine import Machine, load_average  # noqa: E402
from transferkit.serving.k8s import K8sOptions  # noqa: E402
from transferkit.serving.processes import free_port  # noqa: E402


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}"


@contextlib.contextmanager
def serving(run: str, workers: int, log: Path, src: str | None):
    """`transferkit serve RUN` on a free port (the checkout at `src` when given: its own CLI and flags) until
    it answers /readyz -> (url, process); SIGTERM at the end."""
    port = free_port()
    env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
    cmd = [sys.executable, "-m", "transferkit", "serve", run, "--port", str(port), "--workers", str(workers)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    try:
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {log}")
            time.sleep(0.25)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def measure(args, label: str, src: str | None) -> list[str]:
    """One server (this checkout's, or `src`'s): the unloaded client, then every attack -> table rows."""
    pod_limit = int(K8sOptions().memory_for("onnxruntime").removesuffix("Mi"))
    rows = []
    with serving(args.run, args.workers, Path(args.work) / f"serve-{label}.log", src) as (url, proc):
        files = {"image": ("d.png", hostile.digit_png(), "image/png")}
        model = httpx.post(url + "/predict", files=files).json()["model"].split(":")[0]
        with hostile.ServerWatch(proc.pid) as watch:
            workers = {p.pid for p in watch.tree()}
            with hostile.NormalClient(url) as alone:
                time.sleep(args.seconds)
            base_p99 = alone.percentile(99)
            rows.append(
                f"| {label} | none (the normal client alone) | - | - | {ms(alone.percentile(50))} | "
                f"{ms(base_p99)} | {ms(max(alone.latencies))} | 1.00x | 0 | 0 | {watch.peak_rss >> 20} |"
            )
            print(rows[-1], flush=True)
            for name, (attack, size) in hostile.attacks(hostile.Payloads()).items():
                watch.peak_rss = 0
                with hostile.NormalClient(url) as normal:
                    with hostile.Attackers(attack, url, model, args.attackers, args.seconds) as attackers:
                        pass
                answers = ", ".join(f"{s}: {n}" for s, n in sorted(attackers.statuses.items(), key=str))
                # 503 is the admission's answer (at capacity, Retry-After), not a failure; any other 5xx is one
                errors = sum(n for s, n in attackers.statuses.items() if str(s).startswith("5") and s != 503)
                errors += sum(n for s, n in normal.statuses.items() if s != 200)
                restarts = len({p.pid for p in watch.tree()} - workers)
                p99 = normal.percentile(99)
                rows.append(
                    f"| {label} | {name} | {size / 1024:,.1f} KB | {answers} | {ms(normal.percentile(50))} | "
                    f"{ms(p99)} | {ms(max(normal.latencies))} | {p99 / base_p99:.2f}x | {errors} | {restarts} | "
                    f"{watch.peak_rss >> 20} |"
                )
                print(rows[-1], flush=True)
    rows.append(f"| {label} | (the pod's memory limit in the manifests: {pod_limit} MiB) | | | | | | | | | |")
    return rows


def throughput(args, label: str, src: str | None) -> str:
    """The normal load the bounds must not slow: `hey` posting the 32x32 PNG as a raw body at 64 clients."""
    body = Path(args.work) / "digit.png"
    body.write_bytes(hostile.digit_png())
    hey = shutil.which("hey")
    with serving(args.run, args.workers, Path(args.work) / f"serve-{label}-load.log", src) as (url, _):
        run_hey(hey, url + "/predict", body, 500, 64, 120, "warm-up", "image/png")
        level = run_hey(hey, url + "/predict", body, args.load_requests, 64, 300, label, "image/png")
    return f"| {label} | {level.ok_rps:,.0f} | {1000 * level.latencies[99]:.0f} | {level.counts()} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="an exported run")
    ap.add_argument("--attackers", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--load-requests", type=int, default=5000, help="requests of the normal-load row (hey)")
    ap.add_argument("--before-src", help="another checkout's src/ to measure first (before)")
    ap.add_argument("--work", default="/tmp/transferkit-attacks")
    ap.add_argument("--out", default=str(ROOT / "docs" / "security_attacks.md"))
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    rows, load = [], []
    if args.before_src:
        rows += measure(args, "before", str(Path(args.before_src).resolve()))
    rows += measure(args, "this commit", None)
    if shutil.which("hey"):
        if args.before_src:
            load.append(throughput(args, "before", str(Path(args.before_src).resolve())))
        load.append(throughput(args, "this commit", None))
    header = (
        "| server | attack | attacker's bytes per request | attackers' answers (status: count; 0 = connection "
        "closed) | normal p50 ms | normal p99 ms | normal worst ms | p99 vs unloaded | 5xx or failed normal "
        "requests (503: at capacity, not counted) | worker restarts | peak MiB, all processes |"
    )
    lines = [
        "# Hostile clients: what an attack costs a normal client",
        "",
        f"Command: `{command_line()}` at commit {commit()}. Machine: {Machine.this().describe()}. Load average "
        f"(1 min) before: {load_before}, after: {load_average()}.",
        "",
        f"{args.attackers} attacker threads for {args.seconds:g} s per attack, a normal client posting a real 32x32 PNG "
        f"every 50 ms and probing /readyz between; {args.workers} workers; the 32 px model of `{args.run}`. How each "
        "attack is built: tests/serving/hostile.py. Goal: the normal p99 within 2x of its unloaded p99, no 5xx, "
        "no worker restart, memory within the pod's limit.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
        *rows,
    ]
    if load:
        lines += [
            "",
            f"The normal load these bounds must not slow: `hey -n {args.load_requests} -c 64` posting the 32x32 PNG "
            "as a raw body, after 500 requests of warm-up, each server alone on the machine.",
            "",
            "| server | req/s | p99 ms | statuses |",
            "|---|--:|--:|---|",
            *load,
        ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
