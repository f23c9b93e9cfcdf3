"""Load generation for benchmarks/serve_load.py: start a BentoML server, drive it with `hey` (or an asyncio
client when hey is missing), and read what came back (status counts, latency percentiles, batch sizes)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.serving.processes import die_with_parent, free_port, stop_tree

BOUNDARY = "transferkit-load-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass
class Level:
    config: str
    concurrency: int
    seconds: float
    statuses: Counter
    errors: Counter = field(default_factory=Counter)
    latencies: dict = field(default_factory=dict)  # percentile -> seconds, over answered requests
    capped: bool = False
    mean_batch: float | None = None

    @property
    def ok_rps(self) -> float:
        return self.statuses.get(200, 0) / self.seconds if self.seconds > 0 else 0.0

    def counts(self) -> str:
        parts = [f"{code}: {n}" for code, n in sorted(self.statuses.items())]
        parts += [f"no answer: {sum(self.errors.values())} ({', '.join(self.errors)})"] if self.errors else []
        return ", ".join(parts) + (" (stopped at the time cap)" if self.capped else "")


@contextlib.contextmanager
def serving(target: str, env: dict[str, str], log_path: Path, cwd: Path | None = None):
    """`bentoml serve TARGET` in the background until /readyz answers 200 -> its base URL; stopped on exit."""
    import httpx

    url = f"http://127.0.0.1:{(port := free_port())}"
    argv = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv + (["--working-dir", str(cwd)] if cwd else []),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                        break
                time.sleep(0.5)
            else:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"{target} did not become ready (exit code {proc.poll()}):\n{tail}")
            yield url
        finally:
            # SIGTERM, then SIGKILL for whatever of the tree (workers in sessions of their own) is left after 15 s
            stop_tree(proc, 15.0)


def batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of transferkit_batch_size over the server's life, all workers together."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r"^transferkit_batch_size_(sum|count)(?:\{[^}]*\})?\s+(\S+)$", text, re.M)
    return tuple(sum(float(v) for k, v in found if k == kind) for kind in ("sum", "count"))  # type: ignore


def run_hey(
    hey: str,
    url: str,
    body_file: Path,
    n: int,
    c: int,
    cap: float,
    config: str,
    content_type: str = CONTENT_TYPE,
    seconds: float | None = None,
    headers: dict[str, str] | None = None,
) -> Level:
    """`n` requests (or, with `seconds`, as many as that duration takes) from `c` keep-alive clients."""
    amount = ["-z", f"{seconds:g}s"] if seconds else ["-n", str(n)]
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    cmd = [hey, *amount, "-c", str(c), "-m", "POST", "-t", "20", "-T", content_type, *extra, "-D", str(body_file), url]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    capped = False
    try:
        out = proc.communicate(timeout=cap)[0]
    except subprocess.TimeoutExpired:
        capped = True
        proc.send_signal(signal.SIGINT)  # hey stops sending and still prints its report
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    total = re.search(r"Total:\s+([\d.]+) secs", out)
    if total is None:
        raise RuntimeError(f"unexpected hey output:\n{out[-2000:]}")
    answered, _, failed = out.partition("Error distribution:")
    statuses = Counter({int(code): int(k) for code, k in re.findall(r"\[(\d+)\]\s+(\d+) responses", answered)})
    errors: Counter = Counter()
    for k, message in re.findall(r"^\s*\[(\d+)\]\s+(.+)$", failed, re.M):
        errors[message.rsplit(": ", 1)[-1].strip()] += int(k)  # 'Post "...": read: connection reset by peer'
    latencies = {int(p): float(s) for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", answered)}
    return Level(config, c, float(total.group(1)), statuses, errors, latencies, capped)


async def run_client(url: str, body: bytes, n: int, c: int, cap: float, config: str) -> Level:
    import httpx

    statuses, errors, lats = Counter(), Counter(), []
    todo = iter(range(n))  # shared by the connections: each request is sent once
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=20) as client:

        async def connection() -> None:
            for _ in todo:
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers={"content-type": CONTENT_TYPE})
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                lats.append(time.perf_counter() - t)
                statuses[r.status_code] += 1

        start = time.perf_counter()
        _, pending = await asyncio.wait([asyncio.create_task(connection()) for _ in range(c)], timeout=cap)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        seconds = time.perf_counter() - start
    latencies = {p: float(np.percentile(lats, p)) for p in (50, 99)} if lats else {}
    return Level(config, c, seconds, statuses, errors, latencies, bool(pending))
