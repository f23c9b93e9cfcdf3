"""Shared fixtures. Everything runs on real data shipped with the project's setup (see README)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli

# Keep the 2-core CI machine responsive and results repeatable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A private BentoML store for the whole session (set before anything imports bentoml), inherited by
# every CLI subprocess and server the tests start: tests never touch the user's ~/bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="transferkit-tests-bentoml-")
os.environ["BENTOML_DO_NOT_TRACK"] = "True"


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """A real image folder (PATH/train/<class>/*.png, PATH/val/...) made from scikit-learn's digits."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_folder")
    bunch = load_digits()
    rng = np.random.default_rng(0)
    for i in rng.permutation(len(bunch.target))[:300]:
        split = "val" if i % 5 == 0 else "train"
        label = str(bunch.target[i])
        d = root / split / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        pixels = (bunch.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((16, 16)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real (tiny) training run through the CLI: MNIST + Fashion-MNIST, 32 px, a few steps."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_cli("train", "--data", "mnist,fashion-mnist", "--limit", "256", "--epochs", "1", "--image-size", "32",
            "--batch-size", "64", "--out", str(out))  # fmt: skip
    return out


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(run_dir, ExportResult): the tiny two-head run (random heads, no training) exported to ONNX."""
    from tests.export.tiny import exported_tiny_run

    return exported_tiny_run(tmp_path_factory)


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's private BentoML store (models and Bentos the tests made)."""
    import shutil

    shutil.rmtree(os.environ["BENTOML_HOME"], ignore_errors=True)
