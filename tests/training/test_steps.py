"""Training steps (training/steps.py) share one shape, and rounds are planned from the run's config alone."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from transferkit.config import TrainConfig
from transferkit.model import build_model
from transferkit.training.adaptation import PseudoLabeller
from transferkit.training.distill import Teacher
from transferkit.training.rounds import plan_round
from transferkit.training.steps import DistillationStep, MicroBatch, StepContext, SupervisedStep

CLASSES = [str(i) for i in range(10)]


def test_a_later_round_gets_its_own_schedule_and_the_run_config_is_left_alone():
    config = TrainConfig(data=["mnist"], unlabeled=["digits"], epochs=5, round_epochs=2, freeze_epochs=1)
    before = dataclasses.asdict(config)
    assert plan_round(config, 1) is config  # round 1 trains as configured (and records what auto settles)
    second, third = plan_round(config, 2), plan_round(config, 3)
    assert (second.epochs, second.freeze_epochs, second.unlabeled_start) == (2, 0, 0.0)
    assert dataclasses.asdict(second) == {**before, "epochs": 2, "freeze_epochs": 0, "unlabeled_start": 0.0}
    assert second == third and second is not config
    assert dataclasses.asdict(config) == before


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("mobilenet_v2", "none", {"d": CLASSES}, image_size=32)
        teacher = build_model("mobilenet_v2", "none", {"d": CLASSES}, image_size=32).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    labelled = (
        torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.randint(0, 10, (8,), generator=gen),
        torch.zeros(8, dtype=torch.long),
    )
    unlabeled = (
        torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen),
        torch.full((6,), -1),
        labelled[2][:6],
    )
    return model, teacher, labelled, unlabeled


def _context(model, **config) -> StepContext:
    cfg = TrainConfig(data=["mnist"], unlabeled_start=0.0, unlabeled_rampup=0.0, pseudo_threshold=0.0, **config)
    gen = torch.Generator().manual_seed(7)
    return StepContext(cfg, model.preprocessing, ["d"], [1.0], [None], None, gen, total_steps=10)


def _run(step, model, batch, ctx):
    model.train().zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # the same dropout mask in every run
        stats = step.forward_backward(model, batch, ctx)
    grad = model.heads["d"].weight.grad.clone()
    return stats, grad


def test_supervised_and_distillation_steps_share_one_shape(tiny):
    model, teacher, labelled, unlabeled = tiny
    supervised = SupervisedStep(PseudoLabeller(model, model.preprocessing, 0.0, adapt_bn=False), model)
    route = ("d", "d", torch.arange(10))
    distill = DistillationStep([Teacher(Path("teacher"), teacher, teacher.preprocessing, [route])])
    shape = inspect.signature(SupervisedStep.forward_backward)
    assert list(shape.parameters) == ["self", "model", "batch", "ctx"]
    assert inspect.signature(DistillationStep.forward_backward) == shape

    # with kd_weight 0 distillation is cross-entropy on the very view plain training draws from the generator
    ctx = _context(model, kd_weight=0.0)
    plain, plain_grad = _run(supervised, model, MicroBatch(labelled, None, 8), ctx)
    ctx = _context(model, kd_weight=0.0)
    kd, kd_grad = _run(distill, model, MicroBatch(labelled, None, 8), ctx)
    assert set(plain) == {"correct", "seen", "images", "loss"} and set(kd) == set(plain) | {"kd"}
    assert (plain["seen"], plain["images"], kd["seen"], kd["images"]) == (8, 8, 8, 8)
    torch.testing.assert_close(kd["loss"], plain["loss"])
    torch.testing.assert_close(kd_grad, plain_grad)
    assert float(kd["kd"]) > 0

    # a micro-batch backpropagates its share of the step's mean loss, and says so in its stats
    half, half_grad = _run(supervised, model, MicroBatch(labelled, None, 16), _context(model, kd_weight=0.0))
    torch.testing.assert_close(half["loss"] * 2, plain["loss"])
    torch.testing.assert_close(half_grad * 2, plain_grad)

    # unlabeled images: FixMatch adds its counts; distillation teaches them through the teachers alone
    fix, _ = _run(supervised, model, MicroBatch(labelled, unlabeled, 8), _context(model))
    assert set(fix) == set(plain) | {"unl", "kept", "kept_right"} and (fix["images"], fix["unl"]) == (14, 6)
    assert int(fix["kept"]) == 6 and int(fix["kept_right"]) == 0  # threshold 0 keeps all; no true labels
    both, _ = _run(distill, model, MicroBatch(labelled, unlabeled, 8), _context(model))
    assert (both["seen"], both["images"]) == (8, 14)


def test_robust_views_train_cross_entropy_on_the_shifted_view_and_each_robust_view(tiny):
    import torch.nn.functional as F

    from transferkit.training.consistency import js_consistency, shifted_and_robust_views
    from transferkit.training.precision import forward

    model, _, labelled, unlabeled = tiny
    step = SupervisedStep(PseudoLabeller(model, model.preprocessing, 0.0, adapt_bn=False), model)
    images, labels, _ = labelled
    for weight in (0.0, 12.0):
        ctx = _context(model, augment="robust", robust_views=2, consistency_weight=weight)
        stats, _ = _run(step, model, MicroBatch(labelled, None, 8), ctx)
        assert (stats["seen"], stats["images"]) == (8, 24)
        # the same views, drawn again from a fresh generator of the same seed, through the same model
        views = shifted_and_robust_views(images, torch.Generator().manual_seed(7), 3, 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            logits = forward(model.train(), model.preprocessing, views)
        expected = F.cross_entropy(logits["d"].float(), labels.repeat(3))
        if weight:
            expected = expected + weight * js_consistency(logits, labelled[2], ["d"], [1.0], views=3)
        torch.testing.assert_close(stats["loss"], expected.detach(), rtol=1e-4, atol=1e-5)
        assert int(stats["correct"]) == int((logits["d"][:8].argmax(1) == labels).sum())  # the shifted view's
    # FixMatch's unlabeled images follow the views in the batch
    ctx = _context(model, augment="robust", robust_views=1)
    fix, _ = _run(step, model, MicroBatch(labelled, unlabeled, 8), ctx)
    assert (fix["images"], fix["unl"]) == (16 + 6, 6)
