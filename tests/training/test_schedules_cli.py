"""Fine-tune schedule options through the CLI on tiny real runs."""
import json

import torch

from tests.helpers import run_cli

FROZEN = ["--data", "digits", "--limit", "256", "--image-size", "32", "--batch-size", "64", "--epochs", "1",
          "--freeze-epochs", "1", "--no-augment", "--seed", "2"]  # fmt: skip


def test_grad_accum_equals_one_big_batch_when_batchnorm_is_frozen(tmp_path):
    """Heads-only training has no batch-dependent BatchNorm: 4 micro-batches of 16 must give the same step
    as one batch of 64."""
    run_cli("train", *FROZEN, "--out", str(tmp_path / "one"))
    run_cli("train", *FROZEN, "--grad-accum", "4", "--out", str(tmp_path / "four"))
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "four" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_freeze_keeps_the_backbone_at_its_pretrained_weights(tmp_path):
    out = tmp_path / "frozen"
    run_cli("train", *FROZEN, "--out", str(out))
    trained = torch.load(out / "model.pt", weights_only=True)
    import torchvision

    pretrained = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").state_dict()
    for k, v in pretrained.items():
        if not k.startswith("classifier"):
            assert torch.equal(trained[f"backbone.{k}"], v), k  # weights and BatchNorm statistics untouched


def test_many_options_together(tmp_path):
    out = tmp_path / "all"
    proc = run_cli(
        "train", "--data", "digits,fashion-mnist", "--limit", "128", "--image-size", "32", "--batch-size", "32",
        "--epochs", "2", "--freeze-epochs", "1", "--layer-decay", "0.7", "--ema", "0.9", "--grad-accum", "2",
        "--label-smoothing", "0.1", "--class-weights", "auto", "--early-stop", "3",
        "--sampling", "temperature:0.5", "--head-weights", "1,0.5", "--tensorboard", "--out", str(out),
    )  # fmt: skip
    assert "unfreezing the backbone" in proc.stderr
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,") and "val_acc/digits" in header
