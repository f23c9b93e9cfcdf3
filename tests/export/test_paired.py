"""The gate's statistic on constructed cases, at the sample sizes the gate uses: equal models pass, a model worse
by a known margin fails, a more accurate one never fails, and the stated confidence holds (simulated)."""

import numpy as np
import pytest

from transferkit.artifact import TOLERANCES
from transferkit.evaluation.paired import best_provable_drop, images_needed, paired_drop, upper_bound
from transferkit.export.verify import VerifyInputs, compare


def _pair(n: int, accuracy: float, lost: int, gained: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of a reference and a candidate that loses `lost` and gains `gained` images."""
    rng = np.random.default_rng(seed)
    ref = rng.random(n) < accuracy
    got = ref.copy()
    right, wrong = np.flatnonzero(ref), np.flatnonzero(~ref)
    got[rng.choice(right, lost, replace=False)] = False
    got[rng.choice(wrong, gained, replace=False)] = True
    return ref, got


@pytest.mark.parametrize("n", [1000, 10000])
def test_an_equal_model_passes_at_the_sample_sizes_the_gate_uses(n):
    """Disagreeing on 1% of the images, as many lost as gained: no drop, and the bound shows it."""
    ref, got = _pair(n, 0.9, lost=n // 200, gained=n // 200)
    drop = paired_drop(ref, got, 0.95)
    assert drop.drop_points == 0 and drop.within(1.0), drop


@pytest.mark.parametrize("n", [1000, 10000])
def test_a_model_worse_by_two_points_fails(n):
    ref, got = _pair(n, 0.9, lost=n // 50 + n // 200, gained=n // 200)
    drop = paired_drop(ref, got, 0.95)
    assert drop.drop_points == pytest.approx(2.0) and not drop.within(1.0), drop


def test_a_more_accurate_model_never_fails():
    """The photo case the old two-sided delta refused: 256 images, 2 lost and 6 gained (+1.56 points)."""
    ref, got = _pair(256, 0.645, lost=2, gained=6)
    drop = paired_drop(ref, got, 0.95)
    assert drop.drop_points == pytest.approx(-1.5625) and drop.within(1.0), drop


def test_the_bound_keeps_its_confidence():
    """A candidate whose true drop is exactly the tolerance (1 point, with 4% of images discordant) passes in at
    most about 5% of samples of 1000 images: the one-sided 95% guarantee, simulated 4000 times."""
    rng = np.random.default_rng(1)
    n, lose, gain = 1000, 0.025, 0.015  # P(lost) - P(gained) = 1 point
    cells = rng.multinomial(n, [lose, gain, 1 - lose - gain], size=4000)
    passed = np.mean([upper_bound(c[0], c[1], n, 0.95) <= 1.0 for c in cells])
    assert passed <= 0.065, passed


def test_a_sample_too_small_says_how_many_images_it_needs():
    assert best_provable_drop(100, 0.95) > 1.0 >= best_provable_drop(256, 0.95)
    needed = images_needed(1.0, 0.95)
    assert best_provable_drop(needed, 0.95) <= 1.0 < best_provable_drop(needed - 1, 0.95)
    assert images_needed(1.0, 0.95, disagreement=0.02) > needed  # more disagreement needs more images
    ref = np.ones(100, dtype=bool)
    logits = np.stack([ref.astype(np.float32), 1 - ref.astype(np.float32)], 1)  # class 0 everywhere, right
    inputs = VerifyInputs(np.zeros((100, 1)), {"h": np.arange(100)}, {"h": np.zeros(100, np.int64)}, {"h": {"d": 100}})
    report = compare({"h": logits}, {"h": logits}, inputs, "int8")
    assert not report["passed"] and "cannot show a drop <= 1" in report["failures"][0]
    assert "--verify-images" in report["failures"][0] and str(needed) in report["failures"][0]


def test_fp32_is_judged_on_its_measured_drop_and_int8_on_the_bound():
    assert TOLERANCES["fp32"].confidence is None and TOLERANCES["int8"].confidence == 0.95
    ref, got = _pair(256, 0.9, lost=1, gained=0)
    assert paired_drop(ref, got, None).within(0.5)  # 0.39 points measured: within fp32's 0.5
    assert not paired_drop(ref, got, 0.95).within(0.5)  # but 256 images cannot bound it below 0.5


def test_auto_verify_images_takes_whole_small_image_splits_and_a_floor_at_224_px():
    from transferkit.export.verify import VERIFY_FLOOR, auto_verify_images, parse_verify_images

    assert auto_verify_images(32, 2) >= 10_000  # every MNIST / Fashion-MNIST test image
    assert auto_verify_images(224, 1) == auto_verify_images(224, 3) == VERIFY_FLOOR == 2000
    assert best_provable_drop(VERIFY_FLOOR, 0.95) < 0.1  # the floor can show a small bound
    assert parse_verify_images("auto") == "auto" and parse_verify_images("600") == 600
    for bad in ("0", "-3", "many", True):
        with pytest.raises(Exception, match="--verify-images must be auto or >= 1"):
            parse_verify_images(bad)
