"""The common corruptions (transferkit/evaluation/corruptions.py): each changes the image, is the same under a seed
however the images are batched, and matches the benchmark's definition (make_cifar_c.py) where the libraries that
script used, or exact stand-ins, are at hand: PIL, scipy.ndimage, matplotlib's HSV (scikit-image's formulas)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.evaluation.corruptions import PARAMETERS, _motion_blur, corrupt, corrupt_batches
from transferkit.evaluation.robust_options import CORRUPTIONS

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog", "elastic_transform"}


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Six real colour photos at 32 px, uint8 (N,3,32,32): crops of scikit-learn's two sample images."""
    from sklearn.datasets import load_sample_images

    crops = []
    for image in load_sample_images().images:
        for box in ((0, 0, 300, 300), (200, 100, 500, 400), (340, 120, 640, 420)):
            crops.append(np.asarray(Image.fromarray(image).crop(box).resize((32, 32), Image.Resampling.BILINEAR)))
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_the_image_and_repeats_under_its_seed(photos, name):
    for severity in (1, 5):
        once = corrupt(photos, name, severity, seed=7)
        assert once.dtype == torch.uint8 and once.shape == photos.shape
        assert (once.float() - photos.float()).abs().mean() > 0.5, f"{name} at {severity} barely changed the image"
        assert torch.equal(once, corrupt(photos, name, severity, seed=7))
    if name in RANDOM:
        assert not torch.equal(corrupt(photos, name, 3, seed=7), corrupt(photos, name, 3, seed=8))
    # a set corrupted batch by batch: the same again, and no two batches share their draws
    pixels = photos.permute(0, 2, 3, 1).numpy()
    first, second, third = corrupt_batches(pixels, name, 3, 7, "cpu", batch=2)
    assert torch.equal(
        torch.cat([first, second, third]), torch.cat(list(corrupt_batches(pixels, name, 3, 7, "cpu", 2)))
    )
    if name in RANDOM:
        assert not torch.equal(second, corrupt(photos[2:4], name, 3, seed=7, start=0))


def test_the_seed_leaves_torchs_own_random_state_alone(photos):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    corrupt(photos, "gaussian_noise", 3, seed=1)
    assert torch.equal(torch.rand(3), expected)


def _ours(photos, name, severity):
    return corrupt(photos, name, severity).permute(0, 2, 3, 1).numpy().astype(np.float64)


def _unit(photos) -> np.ndarray:
    return photos.permute(0, 2, 3, 1).numpy() / 255.0


def _close(ours: np.ndarray, reference: np.ndarray) -> None:
    """Within one grey level: the benchmark truncates to uint8 where we round."""
    assert np.abs(ours - np.clip(reference, 0, 255)).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_pixel_corruptions_match_the_benchmarks_formulas(photos, severity):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
    from scipy import ndimage

    x = _unit(photos)
    c = PARAMETERS["contrast"][severity - 1]
    mean = x.mean(axis=(1, 2), keepdims=True)
    _close(_ours(photos, "contrast", severity), ((x - mean) * c + mean) * 255)
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + PARAMETERS["brightness"][severity - 1], 0, 1)
    _close(_ours(photos, "brightness", severity), hsv_to_rgb(hsv) * 255)
    hsv = rgb_to_hsv(x)
    a, b = PARAMETERS["saturate"][severity - 1]
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
    _close(_ours(photos, "saturate", severity), hsv_to_rgb(hsv) * 255)
    sigma = PARAMETERS["gaussian_blur"][severity - 1]
    blurred = ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
    _close(_ours(photos, "gaussian_blur", severity), blurred * 255)


@pytest.mark.parametrize("severity", [1, 4, 5])
def test_defocus_and_zoom_blur_match_the_benchmarks_kernels(photos, severity):
    from scipy import ndimage

    x = _unit(photos)
    radius, alias = PARAMETERS["defocus_blur"][severity - 1]
    grid = np.arange(-8, 9)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).astype(np.float64)
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias * alias))
    disk = ndimage.convolve(disk / disk.sum(), np.outer(taps, taps) / taps.sum() ** 2, mode="mirror")
    _close(_ours(photos, "defocus_blur", severity), ndimage.convolve(x, disk[None, :, :, None], mode="mirror") * 255)
    total = x.copy()
    for z in np.arange(1, PARAMETERS["zoom_blur"][severity - 1], 0.01):
        crop = int(np.ceil(32 / z))
        top = (32 - crop) // 2
        grown = ndimage.zoom(x[:, top : top + crop, top : top + crop], (1, z, z, 1), order=1)
        trim = (grown.shape[1] - 32) // 2
        total += grown[:, trim : trim + 32, trim : trim + 32]
    count = len(np.arange(1, PARAMETERS["zoom_blur"][severity - 1], 0.01)) + 1
    _close(_ours(photos, "zoom_blur", severity), total / count * 255)


@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_and_pixelate_are_pils_own(photos, severity):
    quality, share = PARAMETERS["jpeg_compression"][severity - 1], PARAMETERS["pixelate"][severity - 1]
    jpeg, pixelated = [], []
    for image in photos.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        jpeg.append(np.asarray(Image.open(buffer)))
        small = Image.fromarray(image).resize((int(32 * share),) * 2, Image.Resampling.BOX)
        pixelated.append(np.asarray(small.resize((32, 32), Image.Resampling.BOX)))
    _close(_ours(photos, "jpeg_compression", severity), np.stack(jpeg))
    _close(_ours(photos, "pixelate", severity), np.stack(pixelated))


def test_motion_blur_is_imagemagicks_one_sided_gaussian_line(photos):
    radius, sigma = PARAMETERS["motion_blur"][4]
    degrees = torch.tensor([-45.0, -10.0, 0.0, 20.0, 33.0, 45.0])
    ours = _motion_blur(photos.float() / 255, radius, sigma, degrees).permute(0, 2, 3, 1).numpy()
    x = _unit(photos)
    width = 2 * int(np.ceil(radius)) + 1  # ImageMagick's kernel width for a radius
    weights = np.exp(-(np.arange(width) ** 2) / (2 * sigma * sigma))
    weights /= weights.sum()
    ys, xs = np.mgrid[0:32, 0:32]
    for n, angle in enumerate(np.deg2rad(degrees.numpy().astype(np.float64))):
        expected = np.zeros((32, 32, 3))
        for i, w in enumerate(weights):
            col = np.clip(xs + int(np.ceil(i * np.cos(angle) - 0.5)), 0, 31)
            row = np.clip(ys + int(np.ceil(i * np.sin(angle) - 0.5)), 0, 31)
            expected += w * x[n][row, col]
        assert np.abs(ours[n] - expected).max() < 1e-3  # the taps past 4 sigma that we skip weigh less


def test_noise_has_the_benchmarks_statistics():
    grey = torch.full((32, 3, 32, 32), 128, dtype=torch.uint8)
    level = 128 / 255
    for severity in (1, 5):
        noise = corrupt(grey, "gaussian_noise", severity).float() / 255 - level
        assert noise.std().item() == pytest.approx(PARAMETERS["gaussian_noise"][severity - 1], rel=0.05)
        shot = corrupt(grey, "shot_noise", severity).float() / 255
        photons = PARAMETERS["shot_noise"][severity - 1]
        assert shot.var().item() == pytest.approx(level / photons, rel=0.1)  # Poisson: variance = mean / photons
        hit = corrupt(grey, "impulse_noise", severity) != 128
        assert hit.float().mean().item() == pytest.approx(PARAMETERS["impulse_noise"][severity - 1], rel=0.15)
        assert (hit[:, 0] != hit[:, 1]).any()  # each channel value on its own, as scikit-image's s&p


def test_bad_arguments_are_refused(photos):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(photos, "snow", 1)
    with pytest.raises(ValueError, match="severity must be 1 to 5"):
        corrupt(photos, "fog", 6)
    with pytest.raises(ValueError, match="expected uint8"):
        corrupt(photos.float(), "fog", 1)
