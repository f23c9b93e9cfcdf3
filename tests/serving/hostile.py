"""Hostile clients for a real server: small valid requests that cost much, slow senders, floods. Shared by
tests/serving/test_attacks.py (what each attack is answered) and benchmarks/attacks.py (what it does to a
normal client's latency meanwhile).

Each attack is a function (base url, model name) -> one request's outcome: its status (0 for a connection the
server closed or reset, which is how a server refuses a slow sender at the socket). `Attackers` runs one of
them from several threads for a while; `NormalClient` sends a small real image every 50 ms meanwhile and
records its latencies; `ServerWatch` samples the server's processes (resident memory, worker pids).
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
from PIL import Image

Attack = Callable[[httpx.Client, str, str], int]


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def webp_bomb(side: int) -> bytes:
    """A one-colour lossless WebP: a few KB that decode to side x side x 4 bytes."""
    return encode(Image.new("RGB", (side, side), (200, 30, 30)), "WEBP", lossless=True)


def png_bomb(side: int) -> bytes:
    """A one-bit PNG of one colour: side^2 / 8 bytes of pixels compressed to almost nothing."""
    return encode(Image.new("1", (side, side), 1), "PNG", optimize=True)


@dataclass(frozen=True)
class Payloads:
    """The attack bodies, built once (a bomb's encoding takes longer than its upload)."""

    webp_limit: bytes = field(default_factory=lambda: webp_bomb(2048))  # at the pixel limit of a 32 px model
    webp_huge: bytes = field(default_factory=lambda: webp_bomb(8000))  # 64 MP: refused from its header
    png_huge: bytes = field(default_factory=lambda: png_bomb(8000))
    flood_item: bytes = field(default_factory=lambda: webp_bomb(2000))


def _post_image(data: bytes, mime: str) -> Attack:
    return lambda client, url, model: (
        client.post(url + "/predict", content=data, headers={"content-type": mime}).status_code
    )


def attacks(payloads: Payloads) -> dict[str, tuple[Attack, int]]:
    """name -> (the attack, its bytes on the wire per request)."""
    # every body is built once: an attacker that spends its CPU building requests takes it from the server it
    # attacks on a small machine, and the measurement would be of the attacker
    flood, flood_type = _multipart([(f"{i}.webp", payloads.flood_item, "image/webp") for i in range(32)])
    deep = b"[" * 100_000 + b"]" * 100_000
    bomb = gzip.compress(b"0" * (64 << 20))
    amplified: dict[str, bytes] = {}

    def amplification(client: httpx.Client, url: str, model: str) -> int:
        if model not in amplified:
            image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [{"b64": _digit_b64()}]}
            outputs = [{"name": _first_output(client, url, model)}] * 200_000
            amplified[model] = json.dumps({"inputs": [image], "outputs": outputs}).encode()
        return client.post(f"{url}/v2/models/{model}/infer", content=amplified[model]).status_code

    def header_flood(client: httpx.Client, url: str, model: str) -> int:
        headers = {f"x-filler-{i}": "y" * 200 for i in range(400)}  # 80 KB of headers
        try:
            return client.get(url + "/readyz", headers=headers).status_code
        except httpx.HTTPError:
            return 0

    return {
        "WebP 2048x2048, one colour (at a 32 px model's limit)": (
            _post_image(payloads.webp_limit, "image/webp"),
            len(payloads.webp_limit),
        ),
        "WebP 8000x8000, one colour": (_post_image(payloads.webp_huge, "image/webp"), len(payloads.webp_huge)),
        "PNG 8000x8000, one bit": (_post_image(payloads.png_huge, "image/png"), len(payloads.png_huge)),
        "32 WebPs of 2000x2000 in one request": (
            lambda client, url, model: (
                client.post(url + "/predict", content=flood, headers={"content-type": flood_type}).status_code
            ),
            len(flood),
        ),
        "JSON nested 100,000 levels": (
            lambda client, url, model: (
                client.post(url + "/predict", content=deep, headers={"content-type": "application/json"}).status_code
            ),
            len(deep),
        ),
        "v2 infer listing one output 200,000 times": (amplification, 5_300_000),
        "gzip bomb to v2 infer (64 MB of zeros)": (
            lambda client, url, model: (
                client.post(
                    f"{url}/v2/models/{model}/infer", content=bomb, headers={"content-encoding": "gzip"}
                ).status_code
            ),
            len(bomb),
        ),
        "400 headers of 200 bytes": (header_flood, 400 * 220),  # past a server's own bounds on headers
        "slowloris (a byte a second)": (slowloris, 200),
    }


def _multipart(files: list[tuple[str, bytes, str]], field: str = "images") -> tuple[bytes, str]:
    """A multipart/form-data body of `files` (name, bytes, type) -> (body, its content type)."""
    boundary = "hostile-boundary-7f3a"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: {mime}\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data, mime in files
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def slowloris(client: httpx.Client, url: str, model: str, seconds: float = 30.0) -> int:
    """Headers that promise a 100 KB body, then one byte a second: the status the server answers, or 0 when it
    closes the connection."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=seconds) as sock:
        head = (
            f"POST /predict HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: image/png\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        sock.sendall(head.encode())
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                sock.settimeout(1.0)
                try:
                    answer = sock.recv(4096)
                except TimeoutError:
                    sock.sendall(b"\x89")
                    continue
                if not answer:
                    return 0
                return int(answer.split(b" ", 2)[1])
        except OSError:
            return 0
    return -1  # still open after `seconds`: the server never let go


_DIGIT_B64: list[str] = []
_OUTPUT: dict[str, str] = {}


def digit_png() -> bytes:
    from sklearn.datasets import load_digits

    pixels = (load_digits().images[0] * 255 / 16).astype(np.uint8)
    return encode(Image.fromarray(pixels, mode="L").resize((32, 32)), "PNG")


def _digit_b64() -> str:
    import base64

    if not _DIGIT_B64:
        _DIGIT_B64.append(base64.b64encode(digit_png()).decode())
    return _DIGIT_B64[0]


def _first_output(client: httpx.Client, url: str, model: str) -> str:
    if model not in _OUTPUT:
        _OUTPUT[model] = client.get(f"{url}/v2/models/{model}").json()["outputs"][0]["name"]
    return _OUTPUT[model]


class Attackers:
    """`attack` from `count` threads, each sending again as soon as it has its answer, for `seconds`."""

    def __init__(self, attack: Attack, url: str, model: str, count: int, seconds: float) -> None:
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self._lock = threading.Lock()
        self._end = time.monotonic() + seconds
        self._threads = [
            threading.Thread(target=self._run, args=(attack, url, model), daemon=True) for _ in range(count)
        ]

    def _run(self, attack: Attack, url: str, model: str) -> None:
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < self._end:
                try:
                    status = attack(client, url, model)
                except httpx.HTTPError as exc:
                    status, error = 0, type(exc).__name__
                    with self._lock:
                        self.errors[error] += 1
                with self._lock:
                    self.statuses[status] += 1

    def __enter__(self) -> Attackers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._threads:
            t.join(90)


class _InBackground:
    """`_run` in a thread from `with` to its end, which sets `_stop` and waits for the thread."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


class NormalClient(_InBackground):
    """A real image to /predict every `period` s, and /readyz between: their latencies and statuses."""

    def __init__(self, url: str, period: float = 0.05) -> None:
        self.url, self.period = url, period
        self.latencies: list[float] = []
        self.ready_latencies: list[float] = []
        self.statuses: Counter = Counter()
        self._image = digit_png()
        super().__init__()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    files = {"image": ("d.png", self._image, "image/png")}
                    status = client.post(self.url + "/predict", files=files).status_code
                except httpx.HTTPError:
                    status = 0
                self.latencies.append(time.perf_counter() - start)
                self.statuses[status] += 1
                start = time.perf_counter()
                try:
                    client.get(self.url + "/readyz")
                except httpx.HTTPError:
                    self.statuses["readyz failed"] += 1
                self.ready_latencies.append(time.perf_counter() - start)
                self._stop.wait(self.period)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


class ServerWatch(_InBackground):
    """The serve process's tree sampled every 0.1 s: the peak of its resident memory and the workers seen."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_rss = 0
        self.pids: set[int] = set()
        super().__init__()

    def tree(self) -> list[psutil.Process]:
        return [self.root, *self.root.children(recursive=True)]

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self.tree():
                try:
                    total += p.memory_info().rss
                    self.pids.add(p.pid)
                except psutil.NoSuchProcess:
                    pass
            self.peak_rss = max(self.peak_rss, total)
            self._stop.wait(0.1)
