"""`--augment robust` (training/robust_augment.py) and `--adversarial-training fgsm` (training/adversarial.py):
what they do to a batch, that every draw comes from the run's generator, and tiny hardened runs through the CLI
(`--robust-views` among them)."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_cli
from transferkit.config import TrainConfig
from transferkit.model import build_model
from transferkit.training import augment, robust_augment
from transferkit.training.adversarial import fgsm_view
from transferkit.training.robust_augment import GEOMETRIC, INTENSITY, OPERATIONS, robust_view
from transferkit.training.steps import StepContext


def _digits_like(n: int = 64, side: int = 32, seed: int = 0) -> torch.Tensor:
    """float (N,3,S,S) in 0..1: a bright square on black, grey in all channels, as MNIST-style images are."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, side, side)
    for i, (top, left) in enumerate(torch.randint(4, side - 14, (n, 2), generator=gen).tolist()):
        x[i, :, top : top + 10, left : left + 10] = 0.5 + 0.5 * torch.rand(1, generator=gen)
    return x.expand(n, 3, side, side).contiguous()


def test_robust_view_changes_the_images_and_keeps_shape_dtype_and_range():
    x = _digits_like()
    out = robust_view(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0
    changed = (out - x).abs().flatten(1).amax(1) > 1 / 255
    assert changed.float().mean() > 0.9  # a few images may draw a mix share close to 1
    assert torch.equal(x, _digits_like())  # the input is left alone
    assert len(robust_view(x[:0], torch.Generator())) == 0


def test_the_same_seed_gives_the_same_images_and_the_global_rng_is_untouched():
    x = _digits_like()
    before = torch.get_rng_state()
    a = robust_view(x, torch.Generator().manual_seed(5))
    b = robust_view(x, torch.Generator().manual_seed(5))
    c = robust_view(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.get_rng_state())


def test_the_draws_depend_on_the_batch_size_only_never_on_the_pixels():
    """What a resumed run relies on: the generator ends where it would have, whatever the images held."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    robust_view(_digits_like(seed=1), g1)
    robust_view(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(9)), g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_operations_are_augmix_s_and_none_is_an_evaluated_corruption():
    from transferkit.evaluation.robust_options import CORRUPTIONS

    assert set(OPERATIONS) == {"autocontrast", "equalize", "posterize", "solarize"} | set(GEOMETRIC)
    assert not set(OPERATIONS) & set(CORRUPTIONS)
    x = _digits_like(8)
    for name, operation in INTENSITY.items():
        out = operation(x, torch.full((8,), 0.3))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, name


def test_the_affine_grid_is_torch_s_and_a_translation_moves_by_whole_pixels():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, [5, 3, 30, 30], align_corners=False)
    assert torch.allclose(robust_augment._grid(theta, 30), expected, atol=1e-5)
    # translate_x at level 0.2 on a 30 px image: a third of the side x 0.2 = 2 px, content moves left
    which = torch.tensor([len(INTENSITY) + GEOMETRIC.index("translate_x")])
    grid = robust_augment._grid(robust_augment._geometry(which, torch.tensor([0.2]), torch.zeros(1)), 30)
    x = torch.rand(1, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert torch.allclose(moved[..., :-2], x[..., 2:], atol=1e-5) and moved[..., -2:].abs().max() < 1e-6


def test_train_view_by_augment_setting():
    x = _digits_like(16)
    assert augment.train_view(x, torch.Generator().manual_seed(0), "none") is x
    default = augment.train_view(x, torch.Generator().manual_seed(0), "default")
    assert torch.equal(default, augment.weak_view(x, torch.Generator().manual_seed(0)))  # old runs draw as before
    robust = augment.train_view(x, torch.Generator().manual_seed(0), "robust", severity=6)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(robust, robust_view(augment.weak_view(x, gen), gen, severity=6))
    gen = torch.Generator().manual_seed(0)
    assert not torch.equal(robust, robust_view(augment.weak_view(x, gen), gen, severity=3))


def test_fgsm_view_stays_in_the_ball_follows_the_generator_and_keeps_batchnorm_statistics():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("mobilenet_v2", "none", {"d": [str(i) for i in range(10)]}, image_size=32).train()
    cfg = TrainConfig(data=["digits"], adversarial_training="fgsm", adversarial_eps="4/255")
    x, labels, heads = _digits_like(8), torch.arange(8), torch.zeros(8, dtype=torch.long)
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def attacked(seed: int) -> torch.Tensor:
        ctx = StepContext(cfg, model.preprocessing, ["d"], [1.0], [None], None, torch.Generator().manual_seed(seed), 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # dropout
            return fgsm_view(model, ctx, x, labels, heads)

    adv = attacked(1)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= 4 / 255 + 1e-6 and (adv - x).abs().max() > 3 / 255
    assert torch.equal(adv, attacked(1)) and not torch.equal(adv, attacked(2))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())  # the input's gradient only


@pytest.mark.parametrize(
    ("flags", "config_lines"),
    [
        (
            ("--adversarial-training", "fgsm", "--adversarial-eps", "2/255"),
            ("augment: robust", "adversarial_training: fgsm"),
        ),
        (
            ("--robust-views", "2", "--consistency-weight", "6"),
            ("augment: robust", "robust_views: 2", "consistency_weight: 6.0"),
        ),
    ],
)
def test_a_tiny_hardened_run_trains_through_the_cli(tmp_path, flags, config_lines):
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        *("--data", "digits", "--limit", "64", "--image-size", "32", "--batch-size", "32", "--epochs", "1"),
        *("--augment", "robust", *flags, "--out", str(out)),
    )
    assert proc.stdout.strip().splitlines()[-1] == str(out) and (out / "model.pt").is_file()
    config = (out / "config.yaml").read_text()
    assert all(line in config for line in config_lines)
