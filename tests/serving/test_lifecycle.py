"""`transferkit serve` as a service manager stops it: signals drain in-flight requests and stop every process.

BentoML's circus arbiter starts each worker with setsid(), so the workers are outside our process group and
survive their parent; these tests record the whole tree (psutil) before the signal and check that nothing
of it is left afterwards, that the port is free, and that a request in flight still gets its answer.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from PIL import Image

from tests.helpers import run_cli
from transferkit.serving.harness import start_server
from transferkit.serving.processes import descendants, free_port

DRAIN = 6.0
MARGIN = 4.0  # process exit and reaping after the drain deadline, on a busy 2-core machine
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl: Linux only")


def _alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while _alive(procs) and time.monotonic() < end:
        time.sleep(0.1)
    return _alive(procs)


def _bindable(port: int) -> bool:
    """Whether a new server could listen on the port (with SO_REUSEADDR, as BentoML's sockets do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _tree(handle) -> list[psutil.Process]:
    """The serve process's descendants: the `bentoml serve` arbiter and its workers."""
    tree = descendants(handle.process.pid)
    cmdlines = [" ".join(p.cmdline()) for p in tree]
    assert any("bentoml serve" in c for c in cmdlines) and any("worker" in c for c in cmdlines), cmdlines
    return tree


class SlowUpload:
    """A /predict request whose body arrives in two parts `pause` seconds apart: it is in flight (headers
    received, response pending) while the test signals the server."""

    def __init__(self, url: str, pause: float) -> None:
        buf = io.BytesIO()
        Image.new("RGB", (48, 48), (200, 40, 90)).save(buf, "PNG")
        b = "lifecycle-boundary"
        self.body = (
            (
                f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + buf.getvalue()
            + f"\r\n--{b}--\r\n".encode()
        )
        self.headers = {"Content-Type": f"multipart/form-data; boundary={b}", "Content-Length": str(len(self.body))}
        self.url, self.pause = url, pause
        self.started = threading.Event()
        self.result: httpx.Response | Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.started.wait(30)
        time.sleep(0.5)  # the server has read the headers and waits for the rest of the body

    def _chunks(self):
        yield self.body[:40]
        self.started.set()
        time.sleep(self.pause)
        yield self.body[40:]

    def _run(self) -> None:
        try:
            self.result = httpx.post(self.url + "/predict", content=self._chunks(), headers=self.headers, timeout=60)
        except Exception as exc:  # reported by the test
            self.result = exc

    def response(self) -> httpx.Response | Exception | None:
        self.thread.join(30)
        return self.result


def _stop_by_signal(handle, sig: int) -> float:
    t0 = time.monotonic()
    handle.process.send_signal(sig)
    code = handle.process.wait(timeout=DRAIN + MARGIN)
    elapsed = time.monotonic() - t0
    assert code == 0, handle.log_tail()
    return elapsed


@pytest.fixture
def start(exported, tmp_path):
    handles = []

    def _start(**settings):
        handle = start_server(
            exported[0],
            port=None,
            log_path=tmp_path / f"serve{len(handles)}.log",
            drain_timeout=settings.pop("drain_timeout", DRAIN),
            **settings,
        )
        handles.append(handle)
        return handle

    yield _start
    for handle in handles:
        assert handle.stop() == [], "the serve process needed killing"


def test_sigterm_lets_an_inflight_request_finish_then_stops_every_process(start):
    handle = start(workers=2)
    tree = _tree(handle)
    port = int(handle.url.rsplit(":", 1)[1])
    slow = SlowUpload(handle.url, pause=2.0)
    elapsed = _stop_by_signal(handle, signal.SIGTERM)
    response = slow.response()
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert set(response.json()["heads"]) == {"digits", "fashion-mnist"}
    assert elapsed < DRAIN + MARGIN
    assert _wait_gone(tree, 2.0) == []
    assert _bindable(port)
    assert "transferkit: stopped" in handle.log_tail()


HEY = shutil.which("hey")


@pytest.mark.skipif(HEY is None, reason="needs hey, the compiled load generator (`make setup` installs it with apt)")
def test_sigterm_under_64_concurrent_clients_answers_200_or_503_and_resets_nothing(start, images, tmp_path):
    """hey's 64 keep-alive clients send raw PNG bodies; SIGTERM arrives mid-load. /readyz turns 503 at once,
    every request that reached the server is answered 200 or 503 (none reset, no other 5xx), and once the load
    stops (as when the endpoint leaves the load balancer) the server drains and every process exits."""
    handle = start(workers=2, drain_timeout=10.0)
    tree = _tree(handle)
    body = tmp_path / "digit.png"
    body.write_bytes(images["digit.png"])
    hey = subprocess.Popen(
        [HEY, "-z", "4s", "-c", "64", "-m", "POST", "-T", "image/png", "-D", str(body), handle.url + "/predict"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.5)
    handle.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(handle.url + "/readyz", timeout=5).status_code == 503  # out of rotation at once
    report, _ = hey.communicate(timeout=60)
    assert handle.process.wait(timeout=10.0 + MARGIN) == 0, handle.log_tail()
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", report)}
    assert set(codes) <= {200, 503} and codes.get(200, 0) > 0 and codes.get(503, 0) > 0, report
    assert "Error distribution" not in report, report  # no reset, no refused or cut-off connection
    assert "requests turned away" in handle.log_tail()
    assert _wait_gone(tree, 2.0) == []


def test_sigint_stops_every_process_and_the_key_stays_out_of_argv(start, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-lifecycle-key\n")
    handle = start(workers=1, api_key_file=key_file)
    tree = _tree(handle)
    port = int(handle.url.rsplit(":", 1)[1])
    assert "api key on" in handle.log_tail()
    for p in [psutil.Process(handle.process.pid), *tree]:
        assert "s3cret-lifecycle-key" not in " ".join(p.cmdline())
    arbiter = next(p for p in tree if "bentoml serve" in " ".join(p.cmdline()))
    # the workers get the key's file, which they follow through a rotation (serving/keys.py), not the key itself
    env = arbiter.environ()
    assert env.get("TRANSFERKIT_API_KEY_FILE") == str(key_file.resolve()) and "TRANSFERKIT_API_KEY" not in env
    assert _stop_by_signal(handle, signal.SIGINT) < DRAIN + MARGIN
    assert _wait_gone(tree, 2.0) == []
    assert _bindable(port)


def test_a_request_longer_than_the_drain_timeout_does_not_hold_the_server(start):
    handle = start(workers=1, drain_timeout=2.0)
    tree = _tree(handle)
    slow = SlowUpload(handle.url, pause=4.0)
    elapsed = _stop_by_signal(handle, signal.SIGTERM)
    assert elapsed < 2.0 + MARGIN
    assert _wait_gone(tree, 2.0) == []
    response = slow.response()  # cancelled by the server (500) or cut off: either way, not a hang
    assert not isinstance(response, httpx.Response) or response.status_code >= 500


@linux_only
def test_sigkill_of_the_serve_process_still_stops_the_server(start):
    """PR_SET_PDEATHSIG: the arbiter gets SIGTERM when `transferkit serve` dies, and stops its workers."""
    handle = start(workers=1)
    tree = _tree(handle)
    os.killpg(handle.process.pid, signal.SIGKILL)  # the serve process's whole group, as `kill -9 -PGID`
    handle.process.wait(5)
    assert _wait_gone(tree, DRAIN + MARGIN) == []


@linux_only
def test_workers_orphaned_by_a_dead_arbiter_are_found_and_killed(start):
    """The serve process is a subreaper: workers re-parent to it, and it stops them when the arbiter dies."""
    handle = start(workers=1)
    tree = _tree(handle)
    arbiter = next(p for p in tree if "bentoml serve" in " ".join(p.cmdline()))
    arbiter.kill()
    assert handle.process.wait(DRAIN + MARGIN) == 2
    assert _wait_gone(tree, 2.0) == []
    assert "the server exited with code -9" in handle.log_tail()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-batch", "0"], "max_batch must be 1..64"),
        (["--max-images", "9", "--max-queue", "4"], "max_images <= max_queue"),
        (["--api-key-file", "{missing}"], "cannot read the API key file"),
        (["--api-key-file", "{tmp}"], "cannot read the API key file"),  # a directory
        (["--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
    ],
)
def test_bad_settings_are_refused_before_anything_starts(exported, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "no-such-key", tmp=tmp_path) for a in args]
    port = free_port()
    proc = run_cli("serve", str(exported[0]), "--port", str(port), *args, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("transferkit: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and proc.stdout == ""  # no startup line: the server never started


def test_an_empty_api_key_in_the_environment_is_refused(exported, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for env in ({"TRANSFERKIT_API_KEY": "   "}, {"TRANSFERKIT_API_KEY_FILE": str(empty)}):
        proc = run_cli("serve", str(exported[0]), "--port", str(free_port()), check=False, timeout=60, env=env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "empty" in proc.stderr, (env, proc.stderr)


@linux_only
def test_serve_from_python_stops_only_its_own_tree_and_puts_the_subreaper_flag_back(exported, tmp_path):
    """`transferkit.serve()` in an application that has children of its own: after a SIGTERM it stops its server
    (arbiter and workers) and leaves the application's other child running; the process is no longer a subreaper."""
    port = free_port()
    script = tmp_path / "app.py"
    script.write_text(
        f"""
import ctypes, os, signal, subprocess, sys, threading, time
import httpx
import transferkit

sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the application's own
def stop_when_ready():
    for _ in range(600):
        try:
            if httpx.get("http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=stop_when_ready, daemon=True).start()
code = transferkit.serve({str(exported[0])!r}, port={port}, drain_timeout=4)
flag = ctypes.c_int(-1)
ctypes.CDLL(None).prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
print("RESULT", code, sibling.poll(), flag.value, flush=True)
sibling.kill()
"""
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    found = re.search(r"RESULT (\S+) (\S+) (\S+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr[-3000:]
    code, sibling, flag = found.groups()
    assert code == "0" and sibling == "None" and flag == "0", (found.group(0), proc.stderr[-2000:])
    assert _bindable(port)
