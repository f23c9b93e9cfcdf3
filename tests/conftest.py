"""Shared fixtures. Everything runs on real data shipped with the project's setup (see README)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import SESSION_ENV, run_cli, server_processes

# Keep the 2-core CI machine responsive and results repeatable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A private BentoML store for the whole session (set before anything imports bentoml), inherited by
# every CLI subprocess and server the tests start: tests never touch the user's ~/bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="transferkit-tests-bentoml-")
os.environ["BENTOML_DO_NOT_TRACK"] = "True"
# Every process a test starts inherits this mark (and usually BENTOML_HOME), so the session-end check below
# finds the servers this session left behind, and never another session's running on the same machine.
os.environ[SESSION_ENV] = uuid.uuid4().hex
SESSION_START = time.time()
# a server stopped by the last test may still be finishing its drain
LEFTOVER_GRACE_S = 3.0


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
def tiny_run_process(tmp_path_factory) -> subprocess.CompletedProcess:
    """The `transferkit train` behind tiny_run, run once per session; its stdout and stderr, for tests of
    what training prints."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return run_cli(
        "train",
        "--data",
        "mnist,fashion-mnist",
        "--limit",
        "256",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "64",
        "--out",
        str(out),
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_run_process) -> Path:
    """A real (tiny) training run through the CLI: MNIST + Fashion-MNIST, 32 px, a few steps."""
    return Path(tiny_run_process.args[-1])


@pytest.fixture(scope="session")
def probe_run(tmp_path_factory) -> Path:
    """A trained run, made in seconds: linear-probe heads on digits and Fashion-MNIST over frozen ImageNet features
    (far above chance, decisive logits). Shared by the session: copy it (tests.export.tiny.copy_run) to change it."""
    from tests.export.tiny import probe_tiny_run

    return probe_tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(run_dir, ExportResult): the tiny two-head run (random heads, no training) exported to ONNX."""
    from tests.export.tiny import exported_tiny_run

    return exported_tiny_run(tmp_path_factory)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a server process started by a test outlives the session (then stop it), and remove
    the session's private BentoML store (models and Bentos the tests made)."""
    import shutil

    _stop_leftover_servers(session)
    shutil.rmtree(os.environ["BENTOML_HOME"], ignore_errors=True)


def _stop_leftover_servers(session) -> None:
    import psutil

    marks = {"BENTOML_HOME": os.environ["BENTOML_HOME"], SESSION_ENV: os.environ[SESSION_ENV]}
    left = server_processes(SESSION_START, marks)
    if left:
        _, left = psutil.wait_procs(left, timeout=LEFTOVER_GRACE_S)
    if not left:
        return
    lines = []
    for proc in left:
        try:
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"  pid {proc.pid}")
    message = f"{len(left)} server process(es) started by this test session outlived it (now killed):\n" + "\n".join(
        lines
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "leftover server processes", red=True, bold=True)
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
