"""Training through the CLI on real data at 32 px: run directory, determinism, transfer, pseudo-labels."""

import json

import pytest
import torch
import yaml

from tests.helpers import run_cli
from transferkit.model import build_model
from transferkit.runs import load_run_model
from transferkit.training.labels import LabelMap
from transferkit.training.transfer import init_from_run

TINY = ["--limit", "192", "--epochs", "1", "--image-size", "32", "--batch-size", "64"]


def test_run_directory_contract(tiny_run):
    for name in ("config.yaml", "preprocessing.json", "labels.json", "model.pt", "metrics.json", "metrics.csv"):
        assert (tiny_run / name).is_file(), name
    state = torch.load(tiny_run / "model.pt", weights_only=True)
    assert "heads.mnist.weight" in state and state["heads.fashion-mnist.weight"].shape[0] == 10
    labels = json.loads((tiny_run / "labels.json").read_text())
    assert labels["datasets"] == {"mnist": "mnist", "fashion-mnist": "fashion-mnist"}
    assert labels["heads"]["fashion-mnist"][0] == "T-shirt/top"
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert config["image_size"] == 32 and config["epochs"] == 1 and config["lr"] == 1e-3  # resolved defaults
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(metrics["history"][0]["val_acc"]) == {"mnist", "fashion-mnist"}
    model, run = load_run_model(tiny_run)
    assert run.preprocessing.image_size == 32 and model.head_names == ["mnist", "fashion-mnist"]


def test_last_line_is_the_run_directory(tiny_run_process, tiny_run):
    assert tiny_run_process.stdout.strip().splitlines()[-1] == str(tiny_run)
    # stderr is a pipe here, not a terminal: whole lines, no progress-bar redraws
    assert "\r" not in tiny_run_process.stderr and "epoch 1/1" in tiny_run_process.stderr


def test_same_seed_same_result_on_cpu(tiny_run_process, tiny_run, tmp_path):
    """tiny_run's command again (same seed, another --out) gives the same weights, bit for bit."""
    command = tiny_run_process.args[3:]  # after `python -m transferkit`
    assert command[-2] == "--out"
    run_cli(*command[:-1], str(tmp_path / "again"))
    states = [torch.load(d / "model.pt", weights_only=True) for d in (tiny_run, tmp_path / "again")]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "mnist", "--epochs", "0"], "epochs must be >= 1"),
        (["--data", "mnist", "--sampling", "weird"], "sampling must be"),
        (["--data", "mnist", "--backbone", "resnet999"], "unknown backbone"),
        (["--data", "mnist", "--weights", "IMAGENET9K"], "has no weights"),
        (["--data", "nope"], "unknown dataset"),
        (["--data", "mnist", "--augment", "strong"], "augment must be one of default, robust, none"),
        (["--data", "mnist", "--adversarial-training", "fgsm", "--adversarial-eps", "0.5"], "--adversarial-eps must"),
        (["--data", "mnist", "--head-weights", "1,2"], "--head-weights has 2 values"),
        (["--data", "mnist", "--init", "/does/not/exist"], "does not exist"),
        (["--data", "digits", "--backbone", "vit_b_16", "--weights", "none", "--image-size", "32"], "cannot take 32px"),
    ],
)
def test_bad_options_are_refused_before_work(tmp_path, args, message):
    proc = run_cli("train", *args, "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "r" / "model.pt").exists()


def test_config_file_unknown_key_and_cli_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [digits]\nepochs: 1\nlearning_rate: 0.1\n")
    proc = run_cli("train", "--config", str(bad), check=False)
    assert proc.returncode == 2 and "unknown key(s) ['learning_rate']" in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text("data: [digits]\nepochs: 5\nimage_size: 32\nlimit: 64\nbatch_size: 64\n")
    out = tmp_path / "r"
    run_cli("train", "--config", str(good), "--epochs", "1", "--out", str(out))
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 1


def test_existing_run_is_not_overwritten(tiny_run):
    proc = run_cli("train", "--data", "digits", *TINY, "--out", str(tiny_run), check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_mnist_and_digits_share_one_head(tmp_path):
    out = tmp_path / "r"
    run_cli("train", "--data", "mnist,digits", *TINY, "--out", str(out))
    labels = json.loads((out / "labels.json").read_text())
    assert list(labels["heads"]) == ["mnist"] and labels["datasets"]["digits"] == "mnist"


def test_unlabeled_pseudo_labels_and_eval_matrix(tmp_path):
    out = tmp_path / "r"
    # threshold 0: every pseudo-label is confident enough, so coverage (kept / unlabelled seen) is exactly 1
    proc = run_cli(
        "train", "--data", "mnist", "--unlabeled", "digits", "--pseudo-threshold", "0", *TINY, "--out", str(out)
    )
    assert "unlabeled: digits is pseudo-labelled by head mnist" in proc.stderr
    record = json.loads((out / "metrics.json").read_text())["history"][0]
    assert record["pseudo_coverage"] == 1.0 and 0.0 <= record["pseudo_accuracy"] <= 1.0
    run_cli("eval", str(out))
    matrix = json.loads((out / "eval.json").read_text())["matrix"]
    assert matrix["mnist"]["mnist"]["own"] and not matrix["mnist"]["digits"]["own"]
    assert matrix["mnist"]["digits"]["coverage"] == 1.0
    for png in ("eval_matrix.png", "confusion_mnist.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000
    assert "eval_matrix.png" in (out / "report.md").read_text()


def test_init_reuses_backbone_and_matching_head_rows(tiny_run, tmp_path):
    out = tmp_path / "seq"
    proc = run_cli("train", "--data", "digits", "--init", str(tiny_run), *TINY, "--epochs", "1", "--out", str(out))
    assert "head digits <- mnist: 10 rows reused" in proc.stderr
    mapping = json.loads((out / "transfer.json").read_text())
    assert mapping["heads"]["digits"]["from"] == "mnist" and len(mapping["heads"]["digits"]["reused"]) == 10
    run_cli("eval", str(out))
    assert json.loads((out / "eval.json").read_text())["source"]["matrix"]["mnist"]["digits"]["n"] > 0


def test_partial_overlap_keeps_shared_rows(tiny_run):
    source, _ = load_run_model(tiny_run)
    model = build_model("mobilenet_v2", "none", {"mixed": ["3", "Sneaker", "zebra", "1"]}, image_size=32)
    fresh = model.heads["mixed"].weight.detach().clone()
    mapping = init_from_run(model, str(tiny_run), LabelMap())
    w = model.heads["mixed"].weight
    # the head with most shared names is mnist ("3", "1"); "Sneaker" belongs to the other head
    assert mapping["heads"]["mixed"] == {"from": "mnist", "reused": ["3", "1"], "new": ["Sneaker", "zebra"]}
    assert torch.equal(w[0], source.heads["mnist"].weight[3]) and torch.equal(w[3], source.heads["mnist"].weight[1])
    assert torch.equal(w[2], fresh[2])
    src_backbone = source.backbone.state_dict()
    assert all(torch.equal(v, src_backbone[k]) for k, v in model.backbone.state_dict().items())


def test_streamed_image_folder_trains_like_in_memory(digits_folder, tmp_path):
    """A train split over --max-in-memory-gb is decoded by DataLoader workers; same batches, same model."""
    common = ["--data", f"imagefolder:{digits_folder}", "--image-size", "32", "--batch-size", "32", "--epochs", "1"]
    run_cli("train", *common, "--out", str(tmp_path / "memory"))
    run_cli("train", *common, "--max-in-memory-gb", "0", "--workers", "2", "--out", str(tmp_path / "stream"))
    a = torch.load(tmp_path / "memory" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "stream" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
