"""Adapting a run to captured traffic (`train --init RUN --unlabeled traffic:DIR`) and proving the new version
(`transferkit compare NEW OLD --traffic DIR`), end to end on a capture folder in serve's own format."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from tests.helpers import run_cli
from transferkit.evaluation.compare import paired_cell


@pytest.fixture(scope="module")
def captured(tiny_run, tmp_path_factory):
    """Traffic the tiny MNIST + Fashion-MNIST run answered, captured as serve writes it: scikit-learn digits (a
    shifted domain for its MNIST head), 16 images a request, each head's real logits."""
    from transferkit.data import load_dataset
    from transferkit.predictions import rank
    from transferkit.runs import load_run_model
    from transferkit.serving.capture import Capture
    from transferkit.serving.repository import LOGITS, RANKED
    from transferkit.training.evaluate import predict_logits

    model, run = load_run_model(tiny_run)
    pixels = load_dataset("digits", run.preprocessing, limit=160).train.images
    served = SimpleNamespace(name="tiny", version="1", runtime_name="pytorch", labels=run.labels.heads)
    folder = tmp_path_factory.mktemp("captured")
    capture = Capture(folder, rate=1.0, max_bytes=1 << 30)
    for i in range(0, len(pixels), 16):
        batch = pixels[i : i + 16]
        answer = {}
        for head, logits in predict_logits(model, batch, run.preprocessing).items():
            answer[head, LOGITS], answer[head, RANKED] = logits, rank(logits)
        capture.offer(served, batch, answer, f"r{i}", RANKED, LOGITS)
    capture.close()
    return SimpleNamespace(folder=folder, images=pixels)


def test_a_capture_of_several_heads_must_name_the_one_it_belongs_to(tiny_run, captured, tmp_path):
    refused = run_cli("train", "--init", str(tiny_run), "--unlabeled", f"traffic:{captured.folder}", check=False)
    assert refused.returncode == 2
    assert "fashion-mnist" in refused.stderr and f"traffic:{captured.folder}=mnist" in refused.stderr
    labelled = run_cli("train", "--data", f"traffic:{captured.folder}", "--out", str(tmp_path / "x"), check=False)
    assert labelled.returncode == 2 and "has no labels" in labelled.stderr and "--unlabeled" in labelled.stderr
    empty = run_cli("train", "--init", str(tiny_run), "--unlabeled", f"traffic:{tmp_path}", check=False)
    assert empty.returncode == 2 and "no captured parts" in empty.stderr and "--capture" in empty.stderr


@pytest.fixture(scope="module")
def adapted(tiny_run, captured, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "adapted"
    run_cli(
        "train",
        "--init",
        str(tiny_run),
        "--unlabeled",
        f"traffic:{captured.folder}=mnist",
        "--limit",
        "128",
        "--epochs",
        "1",
        "--rounds",
        "2",
        "--round-epochs",
        "1",
        "--batch-size",
        "32",
        "--image-size",
        "32",
        "--out",
        str(out),
    )
    return out


def test_adapting_from_traffic_keeps_the_labelled_data_and_records_the_capture(tiny_run, captured, adapted):
    config = yaml.safe_load((adapted / "config.yaml").read_text())
    source = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["data"] == source["data"]  # the original labelled datasets stay in the mix
    record = json.loads((adapted / "traffic.json").read_text())
    entry = record[f"traffic-{captured.folder.name}"]
    assert entry["source"] == str(captured.folder) and entry["head"] == "mnist"
    assert entry["rows"] == len(captured.images) and entry["models"] == ["tiny"] and entry["versions"] == ["1"]
    assert all(len(p["sha256"]) == 64 for p in entry["parts"]) and sum(p["rows"] for p in entry["parts"]) == 160
    # the run trains on its own snapshot: the server may rotate the capture away, a resume sees the same images
    (spec,) = config["unlabeled"]
    assert (
        spec == f"traffic:{adapted / entry['snapshot']}=mnist"
        and entry["snapshot"] == f"traffic/{captured.folder.name}"
    )
    snapshot = sorted((adapted / entry["snapshot"]).rglob("part-*.parquet"))
    assert [p.relative_to(adapted / entry["snapshot"]).as_posix() for p in snapshot] == [
        p["file"] for p in entry["parts"]
    ]
    # round 2 trained on round 1's labels for the captured images (none of them has a true label to check)
    (labelled,) = [r["pseudo_labels"] for r in json.loads((adapted / "rounds.json").read_text())["rounds"][1:]]
    assert labelled["kept"] > 0 and labelled["accuracy"] is None and (adapted / "model.pt").is_file()


def test_the_captured_images_are_what_the_model_saw(captured):
    from transferkit.data import load_dataset
    from transferkit.preprocess import Preprocessing

    images = load_dataset(f"traffic:{captured.folder}", Preprocessing(image_size=32)).train
    order = np.argsort([img.tobytes() for img in images.images])
    expected = np.argsort([img.tobytes() for img in captured.images])
    assert np.array_equal(images.images[order], captured.images[expected]) and (images.labels == -1).all()
    smaller = load_dataset(f"traffic:{captured.folder}", Preprocessing(image_size=16), limit=20).train
    assert smaller.images.shape == (20, 16, 16, 3)


def test_compare_proves_or_refuses_with_the_paired_bound(tiny_run, captured, adapted, tmp_path):
    result = run_cli(
        "compare", str(adapted), str(tiny_run), "--traffic", str(captured.folder), "--data", "digits",
        "--limit", "200", "--tolerance", "100", "--out", str(tmp_path / "cmp"),
    )  # fmt: skip
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    cells = {(c["head"], c["dataset"]): c for c in report["labelled"]}
    assert {("mnist", "mnist"), ("fashion-mnist", "fashion-mnist"), ("mnist", "digits")} <= set(cells)
    assert report["verdict"] == "promote" and "PROMOTE" in result.stdout  # nothing can lose 100 points
    (traffic,) = [t for t in report["traffic"]["heads"] if t["head"] == "mnist"]
    assert traffic["rows"] == 160 and 0 <= traffic["agreement"] <= 1 and 0 < traffic["new_confidence"] <= 1
    strict = run_cli(
        "compare", str(adapted), str(tiny_run), "--limit", "50", "--tolerance", "0", "--out", str(tmp_path / "s"),
        check=False,
    )  # fmt: skip
    # 50 images cannot show a drop of at most 0 points unless the two models never disagree
    assert strict.returncode == 3 and "REFUSE" in strict.stdout, strict.stderr[-2000:]


@pytest.mark.parametrize(
    ("lost", "gained", "n", "verdict"),
    [(0, 0, 10_000, "ok"), (10, 50, 2_000, "ok"), (80, 10, 2_000, "regression"), (2, 1, 60, "unproven")],
)
def test_paired_cell_verdicts(lost, gained, n, verdict):
    old = np.zeros(n, bool)
    new = np.zeros(n, bool)
    old[:lost] = True  # OLD right, NEW wrong
    new[lost : lost + gained] = True  # NEW right, OLD wrong
    both = slice(lost + gained, lost + gained + n // 2)
    old[both] = new[both] = True
    cell = paired_cell("h", "d", old, new, tolerance=1.0)
    assert (cell.only_old, cell.only_new) == (lost, gained) and cell.verdict == verdict
    assert cell.drop_low <= 100 * (lost - gained) / n <= cell.drop_high
