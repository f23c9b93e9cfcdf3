"""Adaptation to the unlabeled images: AdaBN, the mean teacher, self-training rounds, their config and resume."""

import copy
import json
import re

import numpy as np
import pytest
import torch

from tests.helpers import run_cli
from transferkit.config import config_from_dict
from transferkit.data import DatasetSpec, load_dataset
from transferkit.errors import ConfigError
from transferkit.model import build_model
from transferkit.runs import load_run_model
from transferkit.training import resume, train
from transferkit.training.adaptation import PseudoLabeller, adapt_batchnorm, batch_statistics, batchnorms
from transferkit.training.distributed import DistInfo
from transferkit.training.evaluate import predict_logits
from transferkit.training.rounds import class_balanced
from transferkit.training.trainer import TrainLoop

TINY = dict(
    data=["mnist"],
    unlabeled=["digits"],
    limit=128,
    epochs=1,
    image_size=32,
    batch_size=32,
    device="cpu",
    rounds=1,
    teacher_ema=0.0,
    adapt_bn=False,
)


@pytest.fixture(scope="module")
def digits_32():
    model = build_model("mobilenet_v2", "imagenet", {"d": [str(i) for i in range(10)]}, image_size=32)
    ds = load_dataset(DatasetSpec.parse("digits", with_head=False), model.preprocessing, 128)
    return model, torch.from_numpy(ds.train.images).permute(0, 3, 1, 2).contiguous()


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_adabn_changes_only_batchnorm_statistics(digits_32):
    source, images = digits_32
    model = copy.deepcopy(source).train()
    first = batchnorms(model)[0]
    before_params, before_mean = _params(model), first.running_mean.clone()
    counts = [m.num_batches_tracked.clone() for m in batchnorms(model)]
    seen = adapt_batchnorm(model, images.split(64), model.preprocessing)
    assert seen == len(images) and model.training  # the caller's mode comes back
    after = _params(model)
    assert all(torch.equal(before_params[k], after[k]) for k in before_params)
    assert all(torch.equal(c, m.num_batches_tracked) for c, m in zip(counts, batchnorms(model)))
    # the first BatchNorm follows the stem convolution: its running mean is now that convolution's mean
    # output on the target images (two equal batches: the mean of their means is the overall mean)
    with torch.no_grad():
        x = model.preprocessing.normalize_torch(images.float() / 255).contiguous(memory_format=torch.channels_last)
        target_mean = model.backbone.features[0][0](x).mean(dim=(0, 2, 3))
    assert (before_mean - target_mean).abs().max() > 0.1
    torch.testing.assert_close(first.running_mean, target_mean, atol=1e-4, rtol=1e-4)
    # and the digits look different to the network now: its eval-mode predictions change
    a = predict_logits(source, images, source.preprocessing)["d"]
    b = predict_logits(model, images, model.preprocessing)["d"]
    assert not np.allclose(a, b)


def test_batch_statistics_leave_every_buffer_alone(digits_32):
    source, images = digits_32
    model = copy.deepcopy(source).train()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = model.preprocessing.normalize_torch(images[:64].float() / 255)
    with torch.no_grad(), batch_statistics(model):
        model(x)
        assert not model.backbone.classifier[0].training  # dropout off: no random numbers drawn
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert model.training and all(m.track_running_stats for m in batchnorms(model))


def test_teacher_follows_the_student_by_ema_and_is_the_one_called(digits_32):
    source, images = digits_32
    student = copy.deepcopy(source).train()
    labeller = PseudoLabeller(student, student.preprocessing, teacher_ema=0.75, adapt_bn=True)
    calls = []
    labeller.teacher.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    student.register_forward_hook(lambda m, i, o: calls.append("student"))
    weak = images[:16].float() / 255
    labeller.weak_logits(student, weak)  # pseudo-labels start: the teacher is the student's copy
    assert calls == [16]
    w0 = student.heads["d"].weight.detach().clone()
    with torch.no_grad():
        student.heads["d"].weight.add_(1.0)
    labeller.update(student)
    torch.testing.assert_close(labeller.teacher.heads["d"].weight, w0 + 0.25)
    state = labeller.state_dict()
    assert state["started"] and torch.equal(state["teacher"]["heads.d.weight"], labeller.teacher.heads["d"].weight)


def test_trainer_takes_pseudo_labels_from_the_teacher(tmp_path):
    cfg = config_from_dict(
        {**TINY, "teacher_ema": 0.9, "unlabeled_start": 0.0, "unlabeled_rampup": 0.0, "out": str(tmp_path / "r")}
    )
    loop = TrainLoop(cfg.validate(), tmp_path / "r", DistInfo(), torch.device("cpu"), resuming=False)
    seen = {"teacher": [], "student": []}
    loop.labeller.teacher.register_forward_hook(lambda m, i, o: seen["teacher"].append(len(i[0])))
    loop.model.register_forward_hook(lambda m, i, o: seen["student"].append(len(i[0])))
    labelled, unlabeled = next(iter(loop.step_inputs(0, 0)))
    loop.train_step(labelled, unlabeled)
    n, m = len(labelled[0]), len(unlabeled[0])
    # the teacher sees the weak view; the student only the labelled images and the strong view
    assert seen == {"teacher": [m], "student": [n + m]}
    assert loop.labeller.started


def test_class_balanced_keeps_the_top_share_of_every_class():
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.99, 0.3])
    classes = np.array([0, 0, 0, 0, 1, 1])
    assert class_balanced(conf, classes, 0.5).tolist() == [0, 1, 4]  # 2 of class 0's 4, 1 of class 1's 2


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rounds": 0}, "rounds must be >= 1"),
        ({"teacher_ema": 1.0}, "teacher_ema must be in [0, 1)"),
        ({"round_keep": 0.0}, "round_keep must be in (0, 1]"),
        ({"round_epochs": 0}, "round_epochs must be >= 1"),
    ],
)
def test_bad_adaptation_values_are_refused(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({**TINY, **values}).validate()


def test_bad_adaptation_option_is_refused_before_work(tmp_path):
    proc = run_cli(
        "train",
        "--data",
        "mnist",
        "--unlabeled",
        "digits",
        "--teacher-ema",
        "1.5",
        "--out",
        str(tmp_path / "r"),
        check=False,
    )
    assert proc.returncode == 2 and "--teacher-ema must be in [0, 1)" in proc.stderr and not (tmp_path / "r").exists()


def test_two_rounds_second_learns_the_first_rounds_labels(tmp_path):
    out = tmp_path / "r"
    proc = run_cli(
        "train",
        "--data",
        "mnist",
        "--unlabeled",
        "digits",
        "--rounds",
        "2",
        "--adapt-bn",
        "--limit",
        "128",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "64",
        "--out",
        str(out),
    )
    assert "round 2/2:" in proc.stderr and proc.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "round1" / "model.pt").is_file() and (out / "model.pt").is_file()
    given = json.loads((out / "pseudo_labels.json").read_text())
    record = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert record["round"] == 2 and record["round_labels"]["kept"] == len(given["index"]) > 0
    assert json.loads((out / "transfer.json").read_text())["source_run"] == str(out / "round1")
    assert json.loads((out / "rounds.json").read_text())["rounds"][1]["pseudo_labels"]["round"] == 2
    # the labels are round 1's model's predictions on the digits train images, after AdaBN on them
    model, _ = load_run_model(out / "round1")
    digits = load_dataset(DatasetSpec.parse("digits", with_head=False), model.preprocessing, 128)
    images = torch.from_numpy(digits.train.images).permute(0, 3, 1, 2).contiguous()
    adapt_batchnorm(model, images.split(256), model.preprocessing)
    predicted = predict_logits(model, images, model.preprocessing)["mnist"].argmax(1)
    assert (predicted[given["index"]] == np.asarray(given["labels"])).mean() > 0.97
    # a finished run with rounds: resume has nothing left to do, and train refuses to overwrite it
    assert (
        "already holds a run"
        in run_cli(
            "train", "--data", "mnist", "--unlabeled", "digits", "--rounds", "2", "--out", str(out), check=False
        ).stderr
    )


class _Killed(Exception):
    pass


def test_resume_with_the_teacher_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    values = {
        **TINY,
        "epochs": 2,
        "teacher_ema": 0.9,
        "adapt_bn": True,
        "unlabeled_start": 0.0,
        "unlabeled_rampup": 0.0,
        "checkpoint_every": 3,
    }
    reference = train(config_from_dict({**values, "out": str(tmp_path / "ref")}))

    original = TrainLoop.train_step

    def dies_at_step_seven(self, *batch):
        if self.global_step == 7:  # 4 steps an epoch: after the checkpoint at step 6, in the second epoch
            raise _Killed
        return original(self, *batch)

    monkeypatch.setattr(TrainLoop, "train_step", dies_at_step_seven)
    with pytest.raises(_Killed):
        train(config_from_dict({**values, "out": str(tmp_path / "run")}))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (state["global_step"], state["step"]) == (6, 2) and state["labeller"]["started"]
    assert "heads.mnist.weight" in state["labeller"]["teacher"]
    monkeypatch.setattr(TrainLoop, "train_step", original)
    resume(tmp_path / "run")
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
