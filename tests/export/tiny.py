"""A tiny, untrained-head run dir (no training needed) and its export, shared by tests/export and tests/serving.

Two heads from two real datasets (sklearn digits, Fashion-MNIST), 32 px, ImageNet mobilenet_v2 backbone. The
heads are random, so accuracy is ~10%: enough for contract tests (verify compares runtimes, not quality).
Everything is made once per test session and cached here (both conftests call these helpers).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

DIGITS = [str(i) for i in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
HEADS = {"digits": DIGITS, "fashion-mnist": FASHION}
VERIFY_IMAGES = 128  # per dataset; verify's default is 256, tests keep it short

_cache: dict[str, object] = {}


def make_tiny_run(run_dir: Path, seed: int = 0, weights: str = "imagenet", heads: dict | None = None) -> Path:
    """Write a run dir with the training contract (config.yaml, preprocessing.json, labels.json, model.pt).

    `heads` maps dataset name -> class names (one head per dataset); default: digits and fashion-mnist.
    """
    import torch

    from transferkit.config import TrainConfig
    from transferkit.model import build_model
    from transferkit.runs import Labels, save_run_metadata

    heads = heads or HEADS
    torch.manual_seed(seed)
    model = build_model("mobilenet_v2", weights, heads, image_size=32)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_run_metadata(
        run_dir,
        TrainConfig(data=list(heads), image_size=32, weights=weights),
        model.preprocessing,
        Labels(heads=heads, datasets={name: name for name in heads}, specs={name: name for name in heads}),
    )
    torch.save(model.state_dict(), run_dir / "model.pt")
    return run_dir


def make_probe_run(run_dir: Path, train_images: int = 512) -> Path:
    """make_tiny_run, then each head trained as a linear probe: logistic regression on the frozen ImageNet
    features of `train_images` train images per dataset. A really trained model (decisive logits, accuracy far
    above chance) in seconds, for tests where an untrained head's near-ties would make agreement meaningless."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from transferkit.data import load_dataset
    from transferkit.runs import load_run_model

    make_tiny_run(run_dir)
    model, run = load_run_model(run_dir)
    model.eval()
    for dataset, head in run.labels.datasets.items():
        ds = load_dataset(dataset, run.preprocessing, limit=train_images)
        with torch.inference_mode():
            feats = model.backbone(torch.from_numpy(run.preprocessing.normalize_numpy(ds.train.images))).numpy()
        probe = LogisticRegression(C=0.1, max_iter=500).fit(feats, ds.train.labels)
        weight = np.zeros((len(ds.classes), feats.shape[1]), np.float32)
        bias = np.full(len(ds.classes), -10.0, np.float32)  # a class never seen in the sample stays unlikely
        weight[probe.classes_], bias[probe.classes_] = probe.coef_, probe.intercept_
        model.heads[head].weight.data = torch.from_numpy(weight)
        model.heads[head].bias.data = torch.from_numpy(bias)
    torch.save(model.state_dict(), run_dir / "model.pt")
    return run_dir


def probe_tiny_run(tmp_path_factory) -> Path:
    """make_probe_run, made once per session: tests that change it work on a copy (copy_run)."""
    if "probe" not in _cache:
        _cache["probe"] = make_probe_run(tmp_path_factory.mktemp("runs") / "probe")
    return _cache["probe"]


def exported_tiny_run(tmp_path_factory) -> tuple[Path, object]:
    """(run_dir, ExportResult) of an ONNX export stored in the session's BentoML home (tests/conftest.py);
    made once per session."""
    if "exported" not in _cache:
        from transferkit.export import export_run

        run_dir = make_tiny_run(tmp_path_factory.mktemp("runs") / "tiny-export")
        _cache["exported"] = (run_dir, export_run(run_dir, formats=("onnx",), verify_images=VERIFY_IMAGES))
    return _cache["exported"]


def exported_variant(tmp_path_factory, name: str, seed: int) -> Path:
    """Another tiny run (other random heads, seed `seed`) exported to ONNX: another stored model, named for
    `name`; made once per session and name."""
    key = f"variant-{name}"
    if key not in _cache:
        from transferkit.export import export_run

        run_dir = make_tiny_run(tmp_path_factory.mktemp("runs") / name, seed=seed)
        export_run(run_dir, formats=("onnx",), verify_images=VERIFY_IMAGES)
        _cache[key] = run_dir
    return _cache[key]


def copy_run(run_dir: Path, target: Path) -> Path:
    """A private copy of a run (with its export) for tests that modify it."""
    shutil.copytree(run_dir, target)
    return target


def with_speed(manifest, name: str, images_per_second: float, machine=None, device: str = "cpu"):
    """The manifest with `name` measured at `images_per_second` on `machine` (default: this one), replacing any
    measurement of that machine: what `--runtime auto` reads."""
    from transferkit.machine import Machine
    from transferkit.manifest import Measurement

    m = Measurement(images_per_second, 32, device, "test", machine or Machine.this(), 0.0, "test")
    return manifest.with_artifact(manifest.artifacts[name].with_measurement(m))


def manifest_with(**artifacts):
    """A Manifest holding only artifacts, each given as {"precision": ..., "device": ..., "speed": img/s on this
    machine}: for tests of the order `--runtime auto` tries artifacts in."""
    from transferkit.artifact import FORMAT_SPECS, PASSED, artifact_files
    from transferkit.manifest import ArtifactEntry, Manifest

    manifest = Manifest("0", "", "", {}, "mobilenet_v2", {"image_size": 32}, {}, {}, (), ())
    for name, spec in artifacts.items():
        fmt = name.partition("-")[0]
        precision = spec.get("precision", FORMAT_SPECS[fmt].precisions[0])
        entry = ArtifactEntry(
            name,
            fmt,
            precision,
            FORMAT_SPECS[fmt].runtime,
            tuple(artifact_files(fmt, precision)),
            PASSED,
            device=spec.get("device"),
        )
        manifest = manifest.with_artifact(entry)
        if "speed" in spec:
            manifest = with_speed(manifest, name, spec["speed"], device=spec.get("measured_on", "cpu"))
    return manifest
