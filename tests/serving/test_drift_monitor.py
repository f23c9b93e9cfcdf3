"""The live drift score: the reference stored with each artifact at export, the monitor's windows, and a real
server whose /metrics turns from no drift to drift when the traffic it captures moves."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest

from transferkit.serving.drift_monitor import DriftMonitor


def outputs(rng, n: int, concentration) -> np.ndarray:
    """Logits whose softmax is a Dirichlet draw (what a head answers, up to a constant per row)."""
    return np.log(rng.dirichlet(concentration, size=n)).astype(np.float32)


def test_the_monitor_scores_every_n_rows_and_sees_a_shift():
    rng = np.random.default_rng(0)
    base, moved = np.array([4.0, 2.0, 1.0, 1.0, 0.5]), np.array([0.5, 1.0, 1.0, 2.0, 4.0])
    reference = {"h": rng.dirichlet(base, size=2000).astype(np.float32)}
    seen = []
    monitor = DriftMonitor(lambda *args: seen.append(args), window=400, every=100, min_rows=200)
    for _ in range(4):  # 40 rows at a time, as parts are written: the first score once 200 are in, then every 100
        monitor.observe("m", "1", reference, {"h": outputs(rng, 40, base), "unknown": outputs(rng, 40, base)})
    assert not seen
    for _ in range(6):
        monitor.observe("m", "1", reference, {"h": outputs(rng, 40, base)})
    assert [a[:3] for a in seen] == [("m", "1", "h")] * 2 and not any(a[3].drift for a in seen)
    assert [a[3].rows for a in seen] == [200, 320]  # at 200 rows, then 120 rows later (parts come 40 at a time)
    for _ in range(10):  # the traffic moves: the window fills with the new outputs
        monitor.observe("m", "1", reference, {"h": outputs(rng, 40, moved)})
    assert seen[-1][3].rows == 400 and seen[-1][3].drift and seen[-1][3].p < 1e-6  # the window stops at its size
    scored = len(seen)
    monitor.forget("m", "1")
    for _ in range(4):
        monitor.observe("m", "1", reference, {"h": outputs(rng, 40, moved)})
    assert len(seen) == scored  # forgotten: a fresh window, no score before min_rows again


def test_each_artifact_carries_its_reference_through_the_store(exported):
    from transferkit.drift_reference import load_reference
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.resolve import stored_model_path

    run_dir, result = exported
    manifest = read_manifest(result.export_dir)
    entry = manifest.artifacts["onnx"]
    assert entry.reference == "reference-onnx.npz" and entry.reference in manifest.files
    reference = load_reference(result.export_dir, manifest, entry)
    assert set(reference) == set(manifest.heads)
    for head, probs in reference.items():
        assert probs.shape[1] == len(manifest.heads[head]) and np.allclose(probs.sum(1), 1, atol=1e-4)
    stored_dir = stored_model_path(manifest.tag)
    stored = read_manifest(stored_dir)
    assert stored.artifacts["onnx"].reference == entry.reference and (stored_dir / entry.reference).is_file()
    copy = load_reference(stored_dir, stored, stored.artifacts["onnx"])
    assert all(np.array_equal(copy[h], reference[h]) for h in reference)


@pytest.fixture(scope="module")
def in_and_shifted(exported):
    """PNGs of validation images (the reference is the test images' outputs) and of the same images inverted."""
    from PIL import Image

    from transferkit.data import load_dataset
    from transferkit.runs import load_run

    run = load_run(exported[0])
    pixels = np.concatenate([load_dataset(n, run.preprocessing, limit=150).val.images for n in run.labels.datasets])
    pixels = pixels[np.random.default_rng(0).permutation(len(pixels))]

    def png(image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        return buf.getvalue()

    return [png(p) for p in pixels], [png(255 - p) for p in pixels]


def _drift_metrics(url: str) -> dict[str, tuple[float, float]]:
    """head -> (transferkit_drift_p, transferkit_drift) as /metrics says now."""
    found: dict[str, dict[str, float]] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for name in ("transferkit_drift_p", "transferkit_drift"):
            if line.startswith(name + "{"):
                head = line.split('head="')[1].split('"')[0]
                found.setdefault(head, {})[name] = float(line.split()[-1])
    return {h: (v["transferkit_drift_p"], v["transferkit_drift"]) for h, v in found.items() if len(v) == 2}


def _send_and_wait(url: str, images: list[bytes], until) -> dict[str, tuple[float, float]]:
    for start in range(0, len(images), 20):
        files = [("images", (f"{i}.png", images[i], "image/png")) for i in range(start, min(start + 20, len(images)))]
        assert httpx.post(url + "/predict", files=files, timeout=30).status_code == 200
    deadline = time.monotonic() + 30  # a part is written within capture's FLUSH_S, then scored
    while time.monotonic() < deadline:
        state = _drift_metrics(url)
        if until(state):
            return state
        time.sleep(0.5)
    return _drift_metrics(url)


def test_a_server_reports_no_drift_then_drift_on_metrics(exported, in_and_shifted, tmp_path):
    from transferkit.serving import start_server

    calm, moved = in_and_shifted
    with start_server(
        exported[0], workers=1, capture_dir=str(tmp_path / "capture"), capture_rate=1.0, log_path=tmp_path / "log"
    ) as server:
        before = _send_and_wait(server.url, calm, lambda s: len(s) == 2)
        assert set(before) == {"digits", "fashion-mnist"}, before
        assert all(p >= 0.01 and flag == 0 for p, flag in before.values()), before
        after = _send_and_wait(server.url, moved + moved, lambda s: all(flag == 1 for _, flag in s.values()))
        assert all(p < 0.01 and flag == 1 for p, flag in after.values()), after
