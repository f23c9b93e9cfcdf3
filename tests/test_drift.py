"""`transferkit drift`: the tests on constructed shifts of known size (and none), and the command end to end on
traffic captured in serve's own format from the exported run's real outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from transferkit.evaluation.drift import shift_tests

ALPHA = 0.01


def outputs(rng, n: int, concentration: np.ndarray) -> np.ndarray:
    return rng.dirichlet(concentration, size=n)


def test_no_shift_is_no_drift_and_false_alarms_stay_near_alpha():
    rng = np.random.default_rng(0)
    base = np.array([4.0, 2.0, 1.0, 1.0, 0.5])
    alarms = sum(shift_tests(outputs(rng, 500, base), outputs(rng, 500, base), ALPHA).drift for _ in range(100))
    assert alarms <= 5  # three tests, each corrected at 1%: a handful of 100 same-distribution windows at most


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_a_shift_of_known_size_is_found(strength):
    """A share `strength` of the traffic from another output distribution (classes 3 and 4 favoured)."""
    rng = np.random.default_rng(1)
    base, moved = np.array([4.0, 2.0, 1.0, 1.0, 0.5]), np.array([0.5, 1.0, 1.0, 2.0, 4.0])
    n_moved = int(500 * strength)
    traffic = np.concatenate([outputs(rng, 500 - n_moved, base), outputs(rng, n_moved, moved)])
    result = shift_tests(outputs(rng, 1000, base), traffic, ALPHA)
    assert result.drift and result.p < 1e-4 and result.label_p < ALPHA


def test_a_label_shift_alone_is_seen_by_the_label_test():
    """The same confident outputs, only the classes' shares change (a new product mix, say)."""
    rng = np.random.default_rng(2)
    eye = np.eye(4) * 0.9 + 0.025
    reference = eye[rng.choice(4, 800, p=[0.25, 0.25, 0.25, 0.25])]
    traffic = eye[rng.choice(4, 400, p=[0.55, 0.15, 0.15, 0.15])]
    result = shift_tests(reference, traffic, ALPHA)
    assert result.drift and result.label_p < 1e-6 and result.confidence_p > ALPHA


@pytest.fixture(scope="module")
def traffic(exported, tmp_path_factory):
    """Two capture folders in serve's format, from the exported run's real outputs: in-domain (the val images of
    both datasets, the reference being their test images) and shifted (the same images, inverted)."""
    from transferkit.data import load_dataset
    from transferkit.manifest import read_manifest
    from transferkit.predictions import rank
    from transferkit.runs import load_run
    from transferkit.runtimes.selection import load_runtime
    from transferkit.serving.capture import Capture
    from transferkit.serving.repository import LOGITS, RANKED

    run = load_run(exported[0])
    manifest = read_manifest(run.export_dir)
    runtime = load_runtime("auto", run.export_dir, manifest)
    pixels = np.concatenate(
        [load_dataset(name, run.preprocessing, limit=200).val.images for name in run.labels.datasets]
    )
    pixels = pixels[np.random.default_rng(0).permutation(len(pixels))]  # the datasets' traffic interleaved
    served = SimpleNamespace(name="tiny", version="1", runtime_name=runtime.description, labels=run.labels.heads)
    folders = {}
    for kind, images in (("in-domain", pixels), ("shifted", 255 - pixels)):
        folder = tmp_path_factory.mktemp(kind)
        capture = Capture(folder, rate=1.0, max_bytes=1 << 30)
        for i in range(0, len(images), 16):  # one request of 16 images at a time, as a server would see them
            batch = images[i : i + 16]
            logits = runtime.run(run.preprocessing.normalize_numpy(batch))
            answer = {}
            for head, values in logits.items():
                answer[head, LOGITS] = values
                answer[head, RANKED] = rank(values)  # as ServedVersion.run_batch answers
            capture.offer(served, batch, answer, f"{kind}-{i}", RANKED, LOGITS)
        capture.close()
        folders[kind] = folder
    return folders


def _drift(run_dir, folder, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "transferkit",
            "drift",
            str(run_dir),
            "--traffic",
            str(folder),
            "--reference-images",
            "200",
            "--out",
            str(folder / "report"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_in_domain_traffic_is_no_drift_and_shifted_traffic_exits_3(exported, traffic):
    calm = _drift(exported[0], traffic["in-domain"])
    assert calm.returncode == 0, calm.stdout + calm.stderr[-2000:]
    report = json.loads((traffic["in-domain"] / "report" / "drift.json").read_text())
    assert (
        report["model"] == "tiny"
        and not report["drift"]
        and set(report["reference_rows"]) == {"digits", "fashion-mnist"}
        and report["reference"] == "stored with onnx at export"  # the gate's outputs, kept with the artifact
    )
    moved = _drift(exported[0], traffic["shifted"])
    assert moved.returncode == 3, moved.stdout + moved.stderr[-2000:]
    report = json.loads((traffic["shifted"] / "report" / "drift.json").read_text())
    heads = report["windows"][-1]["heads"]
    assert all(h["drift"] and h["p"] < 1e-6 for h in heads.values())
    assert all(h["needed"] is not None and h["needed"] <= 200 for h in heads.values())  # seen in a few hundred rows
    assert "DRIFT" in moved.stdout and (traffic["shifted"] / "report" / "drift.md").is_file()
    text = (traffic["shifted"] / "report" / "drift.md").read_text()
    for plot in ("drift_p.png", "confidence.png"):  # p-values over the windows; confidence, reference vs newest
        assert f"]({plot})" in text and (traffic["shifted"] / "report" / plot).stat().st_size > 1000


def test_windows_each_get_a_verdict(exported, traffic):
    result = _drift(exported[0], traffic["in-domain"], "--window", "100")
    report = json.loads((traffic["in-domain"] / "report" / "drift.json").read_text())
    assert result.returncode == 0 and len(report["windows"]) >= 3
    assert all(w["rows"] == 100 for w in report["windows"][:-1])


def test_bad_input_is_named(exported, tmp_path):
    empty = _drift(exported[0], tmp_path)
    assert empty.returncode == 2 and "no captured traffic" in empty.stderr
    late = subprocess.run(
        [sys.executable, "-m", "transferkit", "drift", str(exported[0]), "--traffic", str(tmp_path), "--since", "soon"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert late.returncode == 2 and "--since 'soon'" in late.stderr


def test_mmd_holds_still_on_one_distribution_and_sees_a_small_mean_shift():
    from transferkit.evaluation.mmd import mmd_test

    rng = np.random.default_rng(3)
    same = [mmd_test(rng.normal(size=(300, 32)), rng.normal(size=(200, 32)), seed=k).p for k in range(20)]
    assert sum(p < ALPHA for p in same) <= 2 and np.median(same) > 0.1  # p is about uniform without a shift
    moved = mmd_test(rng.normal(size=(300, 32)), rng.normal(size=(200, 32)) + 0.25)
    assert moved.p < ALPHA and moved.mmd2 > 0 and (moved.rows, moved.reference_rows) == (200, 300)


def test_drift_with_mmd_tests_the_backbone_features_of_each_window(exported, traffic):
    calm = _drift(exported[0], traffic["in-domain"], "--mmd")
    assert calm.returncode == 0, calm.stdout + calm.stderr[-2000:]
    (window,) = json.loads((traffic["in-domain"] / "report" / "drift.json").read_text())["windows"]
    assert window["mmd"]["p"] >= ALPHA and not window["mmd"]["drift"] and window["mmd"]["rows"] > 100
    moved = _drift(exported[0], traffic["shifted"], "--mmd")
    assert moved.returncode == 3 and "(features)" in moved.stdout
    (window,) = json.loads((traffic["shifted"] / "report" / "drift.json").read_text())["windows"]
    assert window["mmd"]["drift"] and window["mmd"]["p"] < ALPHA
