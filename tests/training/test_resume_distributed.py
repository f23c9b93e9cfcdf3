"""Exact resume after SIGKILL, and torchrun with two CPU processes (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import run_cli

ARGS = [
    "--data",
    "digits,fashion-mnist",
    "--limit",
    "256",
    "--image-size",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--seed",
    "7",
    "--ema",
    "0.9",
]


def _history(run_dir):
    keep = ("epoch", "train_loss", "train_acc", "val_acc", "val_acc_mean")
    return [{k: h[k] for k in keep} for h in json.loads((run_dir / "metrics.json").read_text())["history"]]


@pytest.mark.slow
# robust: the AugMix-style mix, the training noise and FGSM's random start all draw from the checkpointed generator
@pytest.mark.parametrize(
    "extra", [[], ["--augment", "robust", "--adversarial-training", "fgsm"]], ids=["default", "robust-fgsm"]
)
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, extra):
    reference = tmp_path / "reference"
    run_cli("train", *ARGS, *extra, "--out", str(reference))

    run = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "transferkit", "train", *ARGS, *extra, "--checkpoint-every", "5", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = run / "checkpoint.pt"
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            if state["step"] > 0 and state["epoch"] >= 1:  # mid-epoch, in the second epoch
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = (state["epoch"], state["step"])
                break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_at is not None, "training ended before a mid-epoch checkpoint could be interrupted"
    assert proc.returncode == -signal.SIGKILL

    out = run_cli("train", "--resume", str(run))
    assert f"at epoch {killed_at[0] + 1}, step" in out.stderr
    assert _history(run) == _history(reference)
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_options(tiny_run):
    proc = run_cli("train", "--resume", str(tiny_run), "--epochs", "3", check=False)
    assert proc.returncode == 2 and "drop ['--epochs']" in proc.stderr


def _torchrun(args: list[str], out) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "transferkit",
            "train",
            *args,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(str(out)) == 1  # only rank 0 prints the run directory


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_when_batchnorm_is_frozen(tmp_path):
    """Heads-only training (backbone and its BatchNorm frozen, no augmentation): every process's gradient is
    deterministic, so DDP's average over two half-batches must equal the one-process full-batch step."""
    args = [
        "--data",
        "digits",
        "--limit",
        "256",
        "--image-size",
        "32",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--freeze-epochs",
        "1",
        "--no-augment",
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
    run_cli("train", *args, "--out", str(tmp_path / "single"))
    _torchrun(args, tmp_path / "multi")
    a = torch.load(tmp_path / "single" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "multi" / "model.pt", weights_only=True)
    assert not torch.equal(a["heads.digits.weight"], torch.zeros_like(a["heads.digits.weight"]))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_fine_tune_like_one_process(tmp_path):
    """Full fine-tuning: BatchNorm statistics are per process (half batches), so results agree within a
    tolerance, not exactly."""
    args = [
        "--data",
        "digits",
        "--limit",
        "512",
        "--image-size",
        "32",
        "--batch-size",
        "64",
        "--epochs",
        "3",
        "--lr",
        "0.002",
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
    run_cli("train", *args, "--out", str(tmp_path / "single"))
    _torchrun(args, tmp_path / "multi")
    one, two = _history(tmp_path / "single"), _history(tmp_path / "multi")
    assert len(one) == len(two) == 3
    assert abs(one[-1]["train_loss"] - two[-1]["train_loss"]) < 0.3 * one[-1]["train_loss"]
    assert abs(one[-1]["train_acc"] - two[-1]["train_acc"]) < 0.1
    assert min(one[-1]["val_acc_mean"], two[-1]["val_acc_mean"]) > 0.4  # both really learned (chance: 0.1)
