"""Distillation (`transferkit distill`): the KD loss by hand, heads merged by class names, teachers fed at their
own input size, and a real two-teacher run that evaluates, exports, serves and resumes after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.export.tiny import DIGITS, FASHION
from tests.helpers import run_cli
from transferkit.config import TrainConfig
from transferkit.errors import ConfigError
from transferkit.model import build_model
from transferkit.runs import Labels, save_run_metadata
from transferkit.training.distill import (
    check_teacher,
    distillation_loss,
    kd_loss,
    load_teachers,
    plan_student_heads,
    soft_targets,
    teacher_input,
)
from transferkit.training.labels import LabelMap

# 2 datasets x 128 train images at batch 32: 8 steps
DISTILL = [
    "--data",
    "mnist,fashion-mnist",
    "--limit",
    "128",
    "--epochs",
    "1",
    "--image-size",
    "32",
    "--batch-size",
    "32",
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def teacher48(tmp_path_factory):
    """A second real teacher, MNIST only, trained at 48 px (tiny_run is MNIST + Fashion-MNIST at 32 px)."""
    out = tmp_path_factory.mktemp("teachers") / "mnist48"
    run_cli(
        "train",
        "--data",
        "mnist",
        "--limit",
        "128",
        "--epochs",
        "1",
        "--image-size",
        "48",
        "--batch-size",
        "64",
        "--out",
        str(out),
    )
    return out


@pytest.fixture(scope="module")
def distilled(tiny_run, teacher48, tmp_path_factory):
    out = tmp_path_factory.mktemp("distilled") / "student"
    proc = run_cli("distill", "--teachers", f"{tiny_run},{teacher48}", *DISTILL, "--out", str(out))
    assert f"teacher {teacher48} (48px; student 32px): mnist -> mnist" in proc.stderr
    return out


def _fake_teacher(run_dir, heads: dict[str, list[str]], image_size: int = 32, seed: int = 0):
    """A run dir with random heads and no training (the contract distillation reads: config, labels, model.pt)."""
    torch.manual_seed(seed)
    model = build_model("mobilenet_v2", "none", heads, image_size)
    run_dir.mkdir(parents=True)
    save_run_metadata(
        run_dir,
        TrainConfig(data=list(heads), image_size=image_size, weights="none"),
        model.preprocessing,
        Labels(heads=heads, datasets={h: h for h in heads}),
    )
    torch.save(model.state_dict(), run_dir / "model.pt")
    return run_dir


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_kd_loss_is_its_definition_by_hand():
    z = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    q = np.array([[0.7, 0.2, 0.1], [0.0, 0.25, 0.75]])  # a zero target contributes nothing (0 log 0 = 0)
    t = 2.0
    p = _softmax(z / t)
    kl = [sum(qi * np.log(qi / pi) for qi, pi in zip(qr, pr) if qi > 0) for qr, pr in zip(q, p)]
    expected = np.mean(kl) * t * t
    got = kd_loss(torch.tensor(z, dtype=torch.float32), torch.tensor(q, dtype=torch.float32), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_loss_weighs_kd_on_every_image_and_labels_where_they_exist():
    z_a = np.array([[1.0, -1.0], [0.3, 0.2], [-2.0, 1.0]])  # head a (2 classes)
    z_b = np.array([[0.5, 0.0, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # head b (3 classes)
    q_a, q_b = _softmax(np.array([[3.0, 0.0]] * 3)), _softmax(np.array([[0.0, 1.0, 2.0]] * 3))
    labels, head_ids = np.array([1, 0, -1]), np.array([0, 1, -1])  # the third image is unlabeled
    t, w = 3.0, 0.75
    kd = sum(
        np.mean([np.sum(qr * np.log(qr / pr)) for qr, pr in zip(q, _softmax(z / t))]) * t * t
        for z, q in ((z_a, q_a), (z_b, q_b))
    )
    ce = -np.log(_softmax(z_a)[0, 1]) - np.log(_softmax(z_b)[1, 0])  # each head's mean over its own images
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    total, kd_part, correct = distillation_loss(
        {"a": f(z_a), "b": f(z_b)},
        {"a": f(q_a), "b": f(q_b)},
        torch.tensor(labels),
        torch.tensor(head_ids),
        ["a", "b"],
        [1.0, 1.0],
        [None, None],
        t,
        w,
    )
    assert kd_part.item() == pytest.approx(kd, rel=1e-5)
    assert total.item() == pytest.approx(w * kd + (1 - w) * ce, rel=1e-5)
    assert correct.tolist() == [False, True, False]


def test_heads_merge_by_class_names_and_soft_targets_are_averaged(tmp_path):
    digits_a = _fake_teacher(tmp_path / "a", {"digits": DIGITS}, seed=1)
    reversed_digits = list(reversed(DIGITS))
    digits_b = _fake_teacher(tmp_path / "b", {"numbers": reversed_digits, "fashion": FASHION}, image_size=48, seed=2)
    config = TrainConfig(data=["mnist", "fashion-mnist"], teachers=[str(digits_a), str(digits_b)], temperature=2.0)
    labels = [Labels.from_dict(json.loads((d / "labels.json").read_text())) for d in (digits_a, digits_b)]
    mnist_reversed = [
        (name, reversed_digits if name == "mnist" else classes)
        for name, classes in (("mnist", DIGITS), ("fashion-mnist", FASHION))
    ]
    plan, sources = plan_student_heads(labels, mnist_reversed, LabelMap())
    # same class set -> one head (named after the first teacher's, in its order); another set -> its own head
    assert plan.labels.heads == {"digits": DIGITS, "fashion": FASHION}
    assert sources == {"digits": [(0, "digits"), (1, "numbers")], "fashion": [(1, "fashion")]}
    assert plan.labels.datasets == {"mnist": "digits", "fashion-mnist": "fashion"}
    assert plan.label_remap["mnist"] == list(reversed(range(10)))  # a dataset's order maps into the head's
    with pytest.raises(ConfigError, match="no teacher head has its class names"):
        plan_student_heads(labels, [("cats", ["cat", "dog"])], LabelMap())

    teachers = load_teachers(config, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = soft_targets(teachers, x, temperature=2.0)
    with torch.no_grad():
        za = teachers[0].model(teacher_input(x, teachers[0].preprocessing))["digits"].numpy()
        zb = teachers[1].model(teacher_input(x, teachers[1].preprocessing))
    # teacher b's "numbers" logits are in reverse class order: column j of the student head is its column 9 - j
    expected_digits = (_softmax(za / 2.0) + _softmax(zb["numbers"].numpy()[:, ::-1] / 2.0)) / 2
    np.testing.assert_allclose(got["digits"].numpy(), expected_digits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["fashion"].numpy(), _softmax(zb["fashion"].numpy() / 2.0), rtol=1e-5, atol=1e-6)


def test_each_teacher_sees_the_batch_at_its_own_size_and_statistics(tiny_run, teacher48, tmp_path):
    """A real training step (TrainLoop) with a 32 px and a 48 px teacher: forward pre-hooks record the input."""
    from transferkit.training.distributed import DistInfo
    from transferkit.training.trainer import TrainLoop

    config = TrainConfig(
        data=["mnist"],
        teachers=[str(tiny_run), str(teacher48)],
        image_size=32,
        limit=64,
        batch_size=16,
        epochs=1,
        device="cpu",
        out=str(tmp_path / "r"),
    )
    loop = TrainLoop(config, tmp_path / "r", DistInfo(), torch.device("cpu"), resuming=False)
    seen: dict[str, torch.Tensor] = {}
    for name, model in (("student", loop.model), *((t.dir.name, t.model) for t in loop.stepper.teachers)):
        model.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
    labelled, unlabeled = next(iter(loop.step_inputs(0, 0)))
    stats = loop.train_step(labelled, unlabeled)
    assert float(stats["kd"]) > 0
    assert seen["student"].shape == (16, 3, 32, 32) and seen["tiny"].shape == (16, 3, 32, 32)
    assert seen["mnist48"].shape == (16, 3, 48, 48)
    assert not any(t.model.training for t in loop.stepper.teachers)
    # the 48 px teacher's input is the student's (augmented) view resized, normalised with its own mean/std
    student = loop.setup.preprocessing
    view = seen["student"] * torch.tensor(student.std).view(1, 3, 1, 1) + torch.tensor(student.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(
        seen["mnist48"], teacher_input(view, loop.stepper.teachers[1].preprocessing), atol=1e-5, rtol=0
    )


def test_options_are_refused_before_any_data(tiny_run, tmp_path):
    for values, message in (
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"kd_weight": 1.5}, "kd_weight must be in [0, 1]"),
        ({"heads": "separate"}, "drop --heads separate"),
        ({"teachers": [str(tmp_path / "gone")]}, "does not exist"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            TrainConfig(data=["mnist"], **{"teachers": [str(tiny_run)], **values}).validate()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("config.yaml", "preprocessing.json", "labels.json"):
        (unfinished / name).write_bytes((tiny_run / name).read_bytes())
    with pytest.raises(ConfigError, match="has no model.pt yet"):
        check_teacher(unfinished)
    proc = run_cli("distill", "--data", "mnist", "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "distill needs --teachers" in proc.stderr
    proc = run_cli(
        "distill", "--teachers", str(unfinished), "--data", "mnist", "--out", str(tmp_path / "r"), check=False
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "train --resume" in proc.stderr, proc.stderr


def test_distilled_run_evaluates_exports_and_serves(distilled, tiny_run, teacher48):
    from transferkit.export import export_run
    from transferkit.manifest import read_manifest
    from transferkit.runtimes.selection import load_runtime

    assert json.loads((distilled / "labels.json").read_text())["datasets"] == {
        "mnist": "mnist",
        "fashion-mnist": "fashion-mnist",
    }
    assert "kd_loss" in json.loads((distilled / "metrics.json").read_text())["history"][0]
    proc = run_cli("eval", str(distilled))
    assert "student beside its teachers" in proc.stdout and "teacher mnist48" in proc.stdout
    report = json.loads((distilled / "eval.json").read_text())
    assert [t["run"] for t in report["teachers"]] == [str(tiny_run), str(teacher48)]
    assert report["teachers"][1]["matrix"]["mnist"]["mnist"]["own"]
    costs = {c["name"]: c for c in report["costs"]}
    assert costs["teacher mnist48"]["image_size"] == 48 and costs["student"]["latency_ms"] > 0
    assert costs["student"]["model_bytes"] == (distilled / "model.pt").stat().st_size
    assert "student latency / teachers' summed latency" in (distilled / "report.md").read_text()

    result = export_run(distilled, formats=("onnx",), verify_images=64)
    assert result.ok and result.formats["onnx"].servable
    runtime = load_runtime("auto", result.export_dir, read_manifest(result.export_dir))
    out = runtime.run(np.zeros((3, 3, 32, 32), np.float32))
    assert set(out) == {"mnist", "fashion-mnist"} and out["fashion-mnist"].shape == (3, 10)


def test_sigkill_mid_distillation_then_resume_matches_uninterrupted(distilled, tiny_run, teacher48, tmp_path):
    run = tmp_path / "interrupted"
    cmd = [
        sys.executable,
        "-m",
        "transferkit",
        "distill",
        "--teachers",
        f"{tiny_run},{teacher48}",
        *DISTILL,
        "--checkpoint-every",
        "1",
        "--out",
        str(run),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt, killed_at = run / "checkpoint.pt", None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=True)
            if 0 < state["step"] and not state["finished"]:  # mid-epoch
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = state["step"]
                break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert killed_at is not None, "distillation ended before a mid-epoch checkpoint could be interrupted"

    out = run_cli("train", "--resume", str(run))  # teachers reloaded from the paths in config.yaml
    assert "at epoch 1, step" in out.stderr and "distill: teacher" in out.stderr
    keep = ("epoch", "train_loss", "train_acc", "kd_loss", "val_acc")
    history = [
        [{k: h[k] for k in keep} for h in json.loads((d / "metrics.json").read_text())["history"]]
        for d in (run, distilled)
    ]
    assert history[0] == history[1]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (run, distilled))
    assert all(torch.equal(a[k], b[k]) for k in a)
