"""Traffic capture: every row reported as written is in a whole part, rows are dropped rather than waited for, the
folder stays within its budget, and a real server under load, stopped or killed, leaves only whole parts."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from transferkit.predictions import rank
from transferkit.serving import capture as capture_module
from transferkit.serving.capture import Capture
from transferkit.serving.repository import LOGITS, RANKED
from transferkit.traffic import pixels_of, read_capture

HEADS = {"digits": [str(i) for i in range(10)], "letters": ["a", "b", "c"]}
SERVED = SimpleNamespace(name="digits", version="3", runtime_name="onnxruntime (CPU)", labels=HEADS)


def answer_for(n: int, seed: int) -> tuple[np.ndarray, dict]:
    """n images (S=8) and what run_batch would answer for them: per head, ranked (class, score) rows and logits."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    answer = {}
    for head, labels in HEADS.items():
        logits = rng.normal(size=(n, len(labels))).astype(np.float32)
        answer[head, LOGITS] = logits
        answer[head, RANKED] = rank(logits)  # as ServedVersion.run_batch answers
    return pixels, answer


def test_every_offered_row_is_written_once_whole_and_as_the_model_saw_it(tmp_path):
    capture = Capture(tmp_path, rate=1.0, max_bytes=1 << 30)
    sent = {}

    def client(k: int) -> None:
        for j in range(25):
            pixels, answer = answer_for(2, seed=k * 100 + j)
            rid = f"r{k}-{j}"
            sent[rid] = (pixels, answer)
            capture.offer(SERVED, pixels, answer, rid, RANKED, LOGITS)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    capture.close()
    table = read_capture(tmp_path)
    assert table.num_rows == capture.written == 8 * 25 * 2 and not capture.dropped
    ids = table.column("request_id").to_pylist()
    assert sorted(set(ids)) == sorted(sent) and all(ids.count(r) == 2 for r in sent)
    row = ids.index("r3-7")
    pixels, answer = sent["r3-7"]
    assert np.array_equal(pixels_of(table, row), pixels[0])
    assert table.column("digits_logits")[row].as_py() == pytest.approx(answer["digits", LOGITS][0].tolist())
    best = int(answer["letters", RANKED][0][0]["index"])
    assert table.column("letters_labels")[row].as_py()[0] == HEADS["letters"][best]
    assert {table.column(c)[row].as_py() for c in ("model", "version")} == {"digits", "3"}
    assert not list(tmp_path.rglob(".part-*"))  # no temporary left


def test_a_writer_that_falls_behind_drops_rows_and_never_holds_a_request(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "PENDING_BYTES", 20_000)  # about 40 rows of 8x8 images and their logits
    capture = Capture(tmp_path, rate=1.0, max_bytes=1 << 30)
    stuck = threading.Event()
    real_write = capture._write_part

    def slow_write(*args):
        stuck.wait(30)  # a disk that does not answer
        return real_write(*args)

    monkeypatch.setattr(capture, "_write_part", slow_write)
    offered = 0
    for j in range(300):  # the writer is stuck: every offer must return at once all the same
        pixels, answer = answer_for(1, seed=j)
        capture.offer(SERVED, pixels, answer, f"r{j}", RANKED, LOGITS)
        offered += 1
    stuck.set()
    capture.close()
    assert capture.dropped["writer behind"] > 0
    assert capture.written + capture.dropped["writer behind"] == offered
    assert read_capture(tmp_path).num_rows == capture.written


def test_the_folder_keeps_to_its_budget_by_dropping_the_oldest_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_module, "PART_ROWS", 20)
    capture = Capture(tmp_path, rate=1.0, max_bytes=60_000)
    for batch in range(12):
        for j in range(20):
            pixels, answer = answer_for(1, seed=batch * 20 + j)
            capture.offer(SERVED, pixels, answer, f"b{batch}-{j}", RANKED, LOGITS)
        capture.flush()
    capture.close()
    parts = sorted(tmp_path.rglob("part-*.parquet"))
    assert sum(p.stat().st_size for p in parts) <= 60_000 and 1 <= len(parts) < 12
    kept = {rid.split("-")[0] for rid in read_capture(tmp_path).column("request_id").to_pylist()}
    assert "b11" in kept and "b0" not in kept  # the newest stay


def test_a_part_that_cannot_be_written_is_counted_and_capture_goes_on(tmp_path):
    capture = Capture(tmp_path, rate=1.0, max_bytes=1 << 30)
    (tmp_path / "digits").write_text("a file where the model's folder goes")
    pixels, answer = answer_for(3, seed=1)
    capture.offer(SERVED, pixels, answer, "r", RANKED, LOGITS)
    capture.flush()
    assert capture.dropped == {"write failed": 3} and capture.written == 0
    (tmp_path / "digits").unlink()
    capture.offer(SERVED, pixels, answer, "r2", RANKED, LOGITS)
    capture.close()
    assert capture.written == 3


def test_the_sample_rate_is_kept(tmp_path):
    capture = Capture(tmp_path, rate=0.1, max_bytes=1 << 30)
    for j in range(400):
        pixels, answer = answer_for(5, seed=j)
        capture.offer(SERVED, pixels, answer, f"r{j}", RANKED, LOGITS)
    capture.close()
    assert 120 <= capture.written <= 280  # 2,000 images at 10%: 200, binomial sd 13


@pytest.fixture
def png_digit() -> bytes:
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    buf = io.BytesIO()
    Image.fromarray((load_digits().images[3] * 15).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_served_model_captures_what_it_answered_under_concurrent_load(exported, tmp_path, png_digit):
    from transferkit.serving import start_server

    folder = tmp_path / "capture"
    with start_server(
        exported[0], workers=2, capture_dir=str(folder), capture_rate=1.0, log_path=tmp_path / "serve.log"
    ) as server:

        def send(i: int) -> str:
            rid = f"load-{i:03d}"
            r = httpx.post(
                server.url + "/predict",
                content=png_digit,
                headers={"Content-Type": "image/png", "X-Request-ID": rid},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            return rid

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            sent = set(pool.map(send, range(120)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            written = sum(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("transferkit_capture_rows_total")
            )
            if written >= len(sent):
                break
            time.sleep(0.5)
        table = read_capture(folder)
        assert written == table.num_rows == len(sent)  # what /metrics says was written is there, once
        assert set(table.column("request_id").to_pylist()) == sent
        size = table.column("image_size")[0].as_py()
        assert pixels_of(table, 0).shape == (size, size, 3) and size == 32
        assert len(table.column("digits_labels")[0].as_py()) == 5
        # the live signals, on the same sample: one confidence and one predicted class per row and head
        metrics = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()

        def total(prefix: str, head: str) -> float:
            return sum(float(x.split()[-1]) for x in metrics if x.startswith(prefix) and f'head="{head}"' in x)

        for head in ("digits", "fashion-mnist"):
            assert total("transferkit_capture_top1_confidence_count", head) == len(sent)
            assert total("transferkit_capture_predictions_total", head) == len(sent)


def test_a_killed_server_leaves_only_whole_parts(exported, tmp_path, png_digit):
    from transferkit.serving import start_server

    folder = tmp_path / "capture"
    server = start_server(exported[0], workers=2, capture_dir=str(folder), capture_rate=1.0)
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=5) as client:
            while not stop.is_set():
                try:
                    client.post(server.url + "/predict", content=png_digit, headers={"Content-Type": "image/png"})
                except httpx.HTTPError:
                    pass

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while len(list(folder.rglob("part-*.parquet"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        tree = psutil.Process(server.process.pid)
        for proc in [*tree.children(recursive=True), tree]:  # SIGKILL everything, mid-write or not
            proc.kill()
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    parts = list(folder.rglob("part-*.parquet"))
    assert len(parts) >= 3
    for part in parts:  # each one whole: readable, with its rows
        assert pq.read_table(part).num_rows > 0
