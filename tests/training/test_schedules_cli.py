"""Fine-tune schedule options through the CLI on tiny real runs."""

import json
import math

import pytest
import torch
import yaml

from tests.helpers import run_cli

FROZEN = [
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
    "2",
]


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """One heads-only run shared by the tests below."""
    out = tmp_path_factory.mktemp("frozen") / "run"
    run_cli("train", *FROZEN, "--out", str(out))
    return out


def test_grad_accum_equals_one_big_batch_when_batchnorm_is_frozen(frozen_run, tmp_path):
    """Heads-only training has no batch-dependent BatchNorm: 4 micro-batches of 16 must give the same step
    as one batch of 64."""
    run_cli("train", *FROZEN, "--grad-accum", "4", "--out", str(tmp_path / "four"))
    a = torch.load(frozen_run / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "four" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_freeze_keeps_the_backbone_at_its_pretrained_weights(frozen_run):
    trained = torch.load(frozen_run / "model.pt", weights_only=True)
    import torchvision

    pretrained = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").state_dict()
    for k, v in pretrained.items():
        if not k.startswith("classifier"):
            assert torch.equal(trained[f"backbone.{k}"], v), k  # weights and BatchNorm statistics untouched


def test_many_options_together(tmp_path):
    out = tmp_path / "all"
    proc = run_cli(
        "train",
        "--data",
        "digits,fashion-mnist",
        "--limit",
        "128",
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--freeze-epochs",
        "1",
        "--layer-decay",
        "0.7",
        "--ema",
        "0.9",
        "--grad-accum",
        "2",
        "--label-smoothing",
        "0.1",
        "--class-weights",
        "auto",
        "--early-stop",
        "3",
        "--sampling",
        "temperature:0.5",
        "--head-weights",
        "1,0.5",
        "--tensorboard",
        "--out",
        str(out),
    )
    assert "unfreezing the backbone" in proc.stderr
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,") and "val_acc/digits" in header
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert {
        k: config[k]
        for k in (
            "freeze_epochs",
            "layer_decay",
            "ema",
            "grad_accum",
            "label_smoothing",
            "class_weights",
            "early_stop",
            "sampling",
            "head_weights",
            "tensorboard",
        )
    } == {
        "freeze_epochs": 1,
        "layer_decay": 0.7,
        "ema": 0.9,
        "grad_accum": 2,
        "label_smoothing": 0.1,
        "class_weights": "auto",
        "early_stop": 3,
        "sampling": "temperature:0.5",
        "head_weights": [1.0, 0.5],
        "tensorboard": True,
    }


# Heads only (backbone and BatchNorm frozen), no augmentation, and the gradient clipped to a norm of 1e-12:
# AdamW's steps are then ~1e-9, so the model is, to the loss's precision, the same at every step.
STILL = [
    "--data",
    "digits",
    "--limit",
    "64",
    "--image-size",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "3",
    "--freeze-epochs",
    "3",
    "--no-augment",
    "--seed",
    "1",
    "--clip-grad",
    "1e-12",
    "--early-stop",
    "1",
]


def test_clip_grad_early_stop_and_label_smoothing_take_effect(tmp_path):
    proc = run_cli("train", *STILL, "--out", str(tmp_path / "plain"))
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["history"]
    # clip-grad: the model did not move, so each epoch's loss over the same 64 images and accuracy are unchanged
    assert plain[0]["train_loss"] == pytest.approx(plain[1]["train_loss"], abs=1e-4)
    assert plain[0]["val_acc_mean"] == plain[1]["val_acc_mean"]
    # early stop after 1 epoch without a better validation accuracy: 2 of the 3 epochs
    assert [h["epoch"] for h in plain] == [1, 2] and "early stop" in proc.stderr

    run_cli("train", *STILL, "--label-smoothing", "0.5", "--out", str(tmp_path / "smooth"))
    smooth = json.loads((tmp_path / "smooth" / "metrics.json").read_text())["history"]
    # Same model, same images: smoothing eps turns the loss into (1 - eps) * CE + eps * mean_k(-log p_k), and
    # mean_k(-log p_k) >= log(10) for 10 classes (Jensen), so it is bounded below by what the plain run gives.
    ce = plain[0]["train_loss"]
    assert smooth[0]["train_loss"] != pytest.approx(ce, abs=1e-5)
    assert smooth[0]["train_loss"] >= 0.5 * ce + 0.5 * math.log(10) - 1e-4
