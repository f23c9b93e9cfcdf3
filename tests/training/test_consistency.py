"""`--robust-views` and `--consistency-weight` (training/consistency.py): the Jensen-Shannon term against its
definition, the views a step trains on, the options' refusals, and a killed run that resumes exactly (the CLI run: test_robust_augment.py)."""

import math

import pytest
import torch
from scipy.stats import entropy

from transferkit.config import TrainConfig, config_from_dict
from transferkit.errors import ConfigError
from transferkit.training import augment, resume, train
from transferkit.training.consistency import js_consistency, shifted_and_robust_views
from transferkit.training.robust_augment import robust_view
from transferkit.training.trainer import TrainLoop


def _js_by_entropies(p: list[list[float]]) -> float:
    """JS of several distributions as H(mean) - mean(H): an independent form of mean KL(p_i || mean)."""
    mixture = [sum(col) / len(p) for col in zip(*p, strict=True)]
    return entropy(mixture) - sum(entropy(q) for q in p) / len(p)


def test_js_consistency_matches_the_definition_per_image_on_its_own_head():
    gen = torch.Generator().manual_seed(0)
    n = 4
    logits = {"a": torch.randn(3 * n, 5, generator=gen), "b": torch.randn(3 * n, 3, generator=gen)}
    head_ids = torch.tensor([0, 0, 1, 0])
    got = js_consistency(logits, head_ids, ["a", "b"], [1.0, 2.0], views=3).item()

    def js_of(head: str, i: int) -> float:
        probs = torch.softmax(logits[head], 1).view(3, n, -1)[:, i]
        return _js_by_entropies(probs.tolist())

    head_a = sum(js_of("a", i) for i in (0, 1, 3)) / 3  # image 2 is head b's: head a never sees it
    expected = 1.0 * head_a + 2.0 * js_of("b", 2)
    assert math.isclose(got, expected, rel_tol=1e-4)


def test_js_consistency_is_zero_for_equal_views_and_grows_as_they_part():
    base = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    head_ids = torch.zeros(4, dtype=torch.long)
    same = js_consistency({"h": base.repeat(3, 1)}, head_ids, ["h"], [1.0], views=3)
    assert same.abs().item() < 1e-6
    values = []
    for spread in (0.5, 2.0, 8.0):
        parted = torch.cat([base, base + spread * torch.eye(6)[:4], base - spread * torch.eye(6)[:4]])
        values.append(js_consistency({"h": parted}, head_ids, ["h"], [1.0], views=3).item())
    assert 0 < values[0] < values[1] < values[2] <= math.log(3)  # JS of three distributions is at most log 3
    two = js_consistency({"h": torch.cat([base, base + 8 * torch.eye(6)[:4]])}, head_ids, ["h"], [1.0], views=2)
    probs = torch.softmax(torch.cat([base, base + 8 * torch.eye(6)[:4]]), 1).view(2, 4, -1)
    expected = sum(_js_by_entropies([probs[0, i].tolist(), probs[1, i].tolist()]) for i in range(4)) / 4
    assert math.isclose(two.item(), expected, rel_tol=1e-4)  # any number of views


def test_the_gradient_reaches_every_view():
    logits = torch.randn(9, 4, requires_grad=True)
    js_consistency({"h": logits}, torch.zeros(3, dtype=torch.long), ["h"], [1.0], views=3).backward()
    assert all(row.abs().sum() > 0 for row in logits.grad)


def test_the_views_are_the_shifted_image_then_two_robust_views_of_it_from_the_run_generator():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    views = shifted_and_robust_views(images, torch.Generator().manual_seed(0), severity=3, k=2)
    assert views.shape == (24, 3, 32, 32) and views.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    shifted = augment.weak_view(augment.to_unit(images), gen)
    first, second = robust_view(shifted, gen, 3), robust_view(shifted, gen, 3)
    assert torch.equal(views[:8], shifted)  # what the default recipe trains on stays in the batch
    assert torch.equal(views[8:16], first) and torch.equal(views[16:], second)
    assert not torch.equal(first, second)  # two independent draws
    again = shifted_and_robust_views(images, torch.Generator().manual_seed(0), severity=3, k=2)
    assert torch.equal(views, again)
    one = shifted_and_robust_views(images, torch.Generator().manual_seed(0), severity=3, k=1)
    assert torch.equal(one, views[:16])


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"robust_views": 1}, "add --augment robust"),
        ({"robust_views": 5, "augment": "robust"}, "robust_views must be 0 to 4"),
        ({"robust_views": 1, "augment": "robust", "adversarial_training": "fgsm"}, "choose one"),
        ({"robust_views": 1, "augment": "robust", "teachers": ["runs/t"]}, "drop it or the teachers"),
        ({"robust_views": 2, "augment": "robust", "consistency_weight": -1.0}, "consistency_weight must be >= 0"),
        ({"augment": "robust", "consistency_weight": 12.0}, "add --robust-views 2"),
    ],
)
def test_bad_combinations_are_refused_before_training(fields, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(data=["digits"], **fields).validate()


class _Killed(Exception):
    pass


def test_a_killed_run_with_robust_views_resumes_to_the_uninterrupted_run_s_weights(tmp_path, monkeypatch):
    """The three views draw from the run's checkpointed generator: a resumed run draws what an uninterrupted
    one does, so it ends with bit-identical weights."""
    fields = dict(data=["digits"], limit=96, image_size=32, batch_size=16, epochs=1, device="cpu", seed=3)
    fields.update(augment="robust", robust_views=2, consistency_weight=12.0, checkpoint_every=2)
    reference = train(config_from_dict({**fields, "out": str(tmp_path / "ref")}))
    original = TrainLoop.train_step

    def dies_at_step_3(self, *batch):
        if self.global_step == 3:
            raise _Killed
        return original(self, *batch)

    monkeypatch.setattr(TrainLoop, "train_step", dies_at_step_3)
    with pytest.raises(_Killed):
        train(config_from_dict({**fields, "out": str(tmp_path / "run")}))
    monkeypatch.setattr(TrainLoop, "train_step", original)
    run = resume(tmp_path / "run")
    got = torch.load(run / "model.pt", weights_only=True)
    want = torch.load(reference / "model.pt", weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
