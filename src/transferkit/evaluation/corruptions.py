"""The common corruptions of Hendrycks & Dietterich (ICLR 2019), batched on the torch device.

    corrupted = corrupt(images, "fog", severity=3, seed=0)   # uint8 (N,3,S,S) -> uint8, same device

They apply to the uint8 pixels the model sees (after the resize to the run's input size, before normalisation),
so a corrupted image is one a camera or a codec could have handed us. Severity parameters are CIFAR-10-C's
(make_cifar_c.py in github.com/hendrycks/robustness), made for 32 px images like most of ours; lengths in pixels
(blur radii, motion length, elastic displacement) scale with the input side / 32, so a 224 px run sees the same
blur relative to its image as a 32 px one. Every random draw (noise, motion angle, fog, elastic field) comes from
torch's generator, seeded per call from (seed, corruption, severity, index of the call's first image) inside a
forked RNG state: the same images, seed and batches (corrupt_batches cuts them at BATCH) give the same corrupted
images on the same device, each batch gets draws of its own, and nothing else's randomness moves.

Where a maintained library implements the benchmark's definition, it is used; where the library's version
differs from the definition, the definition is written here with torch ops, and `SOURCES` says which is which:
  torchvision.transforms.v2.functional: gaussian noise, JPEG (libjpeg, as PIL's encoder in the benchmark)
  PIL: pixelate (its BOX resize, the benchmark's own; torch has no BOX filter, and `area` bins pixels otherwise)
  kornia: gaussian blur (separable; torchvision's is one 2-D kernel, over ten times slower at 224 px),
    brightness and saturate (in HSV), fog (the plasma fractal), defocus blur's filtering
  by hand: shot noise (Poisson: no library), impulse noise (kornia's salt-and-pepper hits whole pixels, the
    benchmark each channel value), contrast (torchvision's blends towards the grey mean, the benchmark's towards
    each channel's mean), defocus blur's disk kernel (no library has one), motion blur (kornia's kernel is a
    centred uniform line, the benchmark's ImageMagick one a one-sided Gaussian), zoom blur (the benchmark's crop
    and corner-aligned resize, which torchvision's affine zoom does not reproduce), elastic (torchvision's applies
    one field to a whole batch and has no affine part)
tests/test_corruptions.py checks them against the benchmark's formulas run through PIL, scipy.ndimage and
matplotlib's HSV (scikit-image's formulas): eight within one grey level, motion blur at given angles, the three
noises by their statistics. Fog and elastic are not compared pixel for pixel: fog's fractal is kornia's
diamond-square, its per-level randomness set to fall off as the benchmark's (not the same draws), and elastic
samples the affine map and the displacement in one resampling where the benchmark does two. Motion blur skips
the taps past 4 sigma (weights under 1e-4 of the first).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from transferkit.evaluation.robust_options import CORRUPTIONS

REFERENCE_SIDE = 32  # the image side CIFAR-10-C's pixel lengths were chosen for
BATCH = 256  # images per corrupt() call in corrupt_batches: part of what fixes the draws, so a constant

# name -> the parameter of severity 1..5, from make_cifar_c.py
PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # standard deviation
    "shot_noise": (500, 250, 100, 75, 50),  # photons at full intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # share of values set to 0 or 1
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, its anti-alias sigma
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # ImageMagick radius, sigma
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # np.arange(1, this, 0.01): the zoom factors averaged
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # fog strength, plasma wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards each channel's mean
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),  # HSV saturation * a + b
    "jpeg_compression": (80, 65, 58, 50, 40),  # quality
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # side kept, as a share
    "elastic_transform": (  # displacement alpha, its smoothing sigma, affine jitter; as shares of the side
        (0, 0, 0.08),
        (0.05, 0.2, 0.07),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.05),
        (0.1, 0.03, 0.03),
    ),
}


def _blur(x: torch.Tensor, sigma: float, truncate: float, border: str) -> torch.Tensor:
    """A Gaussian blur reaching `truncate` sigmas, in two 1-D passes (kornia's; torchvision's blur is one 2-D
    kernel, whose cost grows with the square of the reach: 40x slower for a 224 px image's elastic field)."""
    from kornia.filters import gaussian_blur2d

    radius = int(truncate * sigma + 0.5)
    return gaussian_blur2d(x, (2 * radius + 1,) * 2, (sigma, sigma), border_type=border)


def _gaussian_noise(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return TF.gaussian_noise(x, mean=0.0, sigma=sigma, clip=True)


def _shot_noise(x: torch.Tensor, photons: float) -> torch.Tensor:
    return torch.poisson(x * photons) / photons


def _impulse_noise(x: torch.Tensor, amount: float) -> torch.Tensor:
    hit = torch.rand_like(x) < amount
    salt = torch.rand_like(x) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def _defocus_blur(x: torch.Tensor, radius: float, alias_sigma: float) -> torch.Tensor:
    from kornia.filters import filter2d, gaussian_blur2d

    scale = x.shape[-1] / REFERENCE_SIDE
    r, alias = radius * scale, alias_sigma * scale
    k = 3 if r <= 8 else 5  # the benchmark's anti-alias kernel size
    # the disk's support plus the anti-alias blur's reach: the benchmark's larger kernel adds only zeros
    half = math.ceil(r) + k // 2 + 1
    grid = torch.arange(-half, half + 1, dtype=torch.float32, device=x.device)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= r**2).float()
    disk = gaussian_blur2d(disk[None, None] / disk.sum(), (k, k), (alias, alias), border_type="reflect")[0]
    return filter2d(x, disk, border_type="reflect")  # OpenCV's filter2D border, as the benchmark ran it


def _motion_blur(x: torch.Tensor, radius: float, sigma: float, degrees: torch.Tensor | None = None) -> torch.Tensor:
    """ImageMagick's MotionBlurImage, as the benchmark calls it: pixel p becomes the sum over taps i = 0..2r of
    exp(-i^2 / 2 sigma^2) * x(p + offset_i), normalised, with offset_i = ceil(i * (cos a, sin a) - 0.5) at an angle
    a drawn in [-45, 45] degrees per image (`degrees`: given instead); a tap past the border reads the edge pixel
    (ImageMagick's default virtual pixels)."""
    n, c, h, w = x.shape
    scale = w / REFERENCE_SIDE
    r, s = radius * scale, sigma * scale
    taps = min(2 * math.ceil(r) + 1, math.ceil(4 * s) + 1)  # weights past 4 sigma are below 1e-4 of the first
    weights = torch.exp(-(torch.arange(taps, dtype=torch.float64) ** 2) / (2 * s * s))
    weights = (weights / weights.sum()).tolist()
    degrees = torch.rand(n, device=x.device) * 90 - 45 if degrees is None else degrees.to(x.device)
    angle = torch.deg2rad(degrees.double()).view(n, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    flat = x.reshape(n, c, h * w)
    out = torch.zeros_like(flat)
    for i, weight in enumerate(weights):  # integer offsets, as ImageMagick computes them: one gather per tap
        col = (xs + torch.ceil(i * torch.cos(angle) - 0.5)).clamp(0, w - 1)
        row = (ys + torch.ceil(i * torch.sin(angle) - 0.5)).clamp(0, h - 1)
        index = (row * w + col).long().view(n, 1, h * w).expand(n, c, h * w)
        out += weight * flat.gather(2, index)
    return out.view(n, c, h, w)


def _clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """The benchmark's clipped_zoom: the centre ceil(S / zoom) pixels, resized by `zoom` with linear
    interpolation that aligns the corners (scipy.ndimage.zoom, order 1), the centre S pixels of that."""
    side = x.shape[-1]
    crop = math.ceil(side / zoom)
    top = (side - crop) // 2
    grown = round(crop * zoom)  # scipy's output size
    out = F.interpolate(
        x[..., top : top + crop, top : top + crop], size=(grown, grown), mode="bilinear", align_corners=True
    )
    trim = (grown - side) // 2
    return out[..., trim : trim + side, trim : trim + side]


def _zoom_blur(x: torch.Tensor, top: float) -> torch.Tensor:
    zooms = np.arange(1, top, 0.01)  # as the benchmark writes it (floating point decides whether `top` is in)
    total = x.clone()  # the benchmark counts the original twice: once on its own, once as zoom 1.0
    for z in zooms:
        total += _clipped_zoom(x, float(z))
    return total / (len(zooms) + 1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    s = sigma * x.shape[-1] / REFERENCE_SIDE
    # scikit-image's reach (truncate=4) and border (nearest), which the benchmark used
    return _blur(x, s, truncate=4.0, border="replicate")


def _fog(x: torch.Tensor, strength: float, decay: float) -> torch.Tensor:
    from kornia.contrib import diamond_square

    n, _, h, w = x.shape
    # The benchmark's plasma divides its random amplitude by decay^2 per level (wibble * uniform(-wibble, wibble));
    # kornia's diamond-square mixes in randomness with weight roughness^k: the same fall-off is roughness = 1/decay^2.
    plasma = diamond_square(
        (n, 1, h, w), roughness=1.0 / decay**2, normalize_range=(0.0, 1.0), device=x.device, dtype=x.dtype
    )
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * plasma) * peak / (peak + strength)


def _brightness(x: torch.Tensor, shift: float) -> torch.Tensor:
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    h, s, v = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack([h, s, (v + shift).clamp(0, 1)], 1))


def _contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _saturate(x: torch.Tensor, factor: float, shift: float) -> torch.Tensor:
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    h, s, v = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack([h, (s * factor + shift).clamp(0, 1), v], 1))


def _jpeg_compression(x: torch.Tensor, quality: int) -> torch.Tensor:
    pixels = (x * 255).round().to(torch.uint8).cpu()  # exact: x came from uint8; libjpeg encodes on the CPU
    return TF.jpeg(pixels, quality=quality).to(x.device).float() / 255


def _pixelate(x: torch.Tensor, share: float) -> torch.Tensor:
    """PIL's BOX resize down to `share` of the side and back, as the benchmark does it, image by image on the CPU
    (torch has no BOX filter; its `area` mode bins pixels differently when the sizes do not divide)."""
    from PIL import Image

    side = x.shape[-1]
    small = (int(side * share),) * 2
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(p).resize(small, Image.Resampling.BOX).resize((side, side), Image.Resampling.BOX)
            )
            for p in pixels
        ]
    )
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).float() / 255


def _elastic_transform(x: torch.Tensor, alpha: float, sigma: float, jitter: float) -> torch.Tensor:
    """A random affine map (three points moved by up to `jitter`), then a smooth random displacement field (uniform
    noise blurred by `sigma`, times `alpha`), sampled once: out(p) = x(A^-1 (p + d(p))), reflected at the border."""
    n, _, h, w = x.shape
    alpha, sigma, jitter = alpha * w, sigma * w, jitter * w
    dev = x.device
    centre, half = float(w // 2), float(w // 3)
    src = torch.tensor([[centre + half] * 2, [centre + half, centre - half], [centre - half] * 2], device=dev)
    dst = src + (torch.rand(n, 3, 2, device=dev) * 2 - 1) * jitter
    ones = torch.ones(n, 3, 1, device=dev)
    forward = torch.linalg.solve(torch.cat([src.expand(n, 3, 2), ones], 2), dst).transpose(1, 2)  # (n, 2, 3)
    bottom = torch.tensor([0.0, 0.0, 1.0], device=dev).expand(n, 1, 3)
    inverse = torch.linalg.inv(torch.cat([forward, bottom], 1))
    field = torch.rand(n, 2, h, w, device=dev) * 2 - 1
    if sigma > 0:
        field = _blur(field, sigma, truncate=3.0, border="reflect")  # the benchmark smooths with truncate=3
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    px = xs + field[:, 0] * alpha  # (n, h, w), pixel coordinates
    py = ys + field[:, 1] * alpha
    sx = inverse[:, 0, 0, None, None] * px + inverse[:, 0, 1, None, None] * py + inverse[:, 0, 2, None, None]
    sy = inverse[:, 1, 0, None, None] * px + inverse[:, 1, 1, None, None] * py + inverse[:, 1, 2, None, None]
    grid = torch.stack([sx * 2 / (w - 1) - 1, sy * 2 / (h - 1) - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "zoom_blur": _zoom_blur,
    "gaussian_blur": _gaussian_blur,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "saturate": _saturate,
    "jpeg_compression": _jpeg_compression,
    "pixelate": _pixelate,
    "elastic_transform": _elastic_transform,
}
if set(_FUNCTIONS) != set(CORRUPTIONS) or set(PARAMETERS) != set(CORRUPTIONS):  # robust_options names them
    raise ImportError("corruptions.py and robust_options.CORRUPTION_FAMILIES name different corruptions")

SOURCES: dict[str, str] = {
    "gaussian_noise": "torchvision gaussian_noise",
    "shot_noise": "torch.poisson",
    "impulse_noise": "by hand (per channel value)",
    "defocus_blur": "disk kernel by hand, kornia filter2d",
    "motion_blur": "by hand (ImageMagick's one-sided Gaussian)",
    "zoom_blur": "by hand (torch interpolate)",
    "gaussian_blur": "kornia gaussian_blur2d",
    "fog": "kornia diamond_square",
    "brightness": "kornia HSV",
    "contrast": "by hand (per channel mean)",
    "saturate": "kornia HSV",
    "jpeg_compression": "torchvision jpeg (libjpeg)",
    "pixelate": "PIL BOX resize",
    "elastic_transform": "by hand (torch grid_sample)",
}


def _seed(seed: int, name: str, severity: int, start: int) -> int:
    """One seed per (seed, corruption, severity, first image): a batch's draws do not depend on which other
    corruptions or batches ran before it."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode()), severity, start]).generate_state(1)[0])


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """uint8 (N,3,S,S) on any device -> the corrupted uint8 images, same shape and device. `start`: the index of
    images[0] in the whole set, which the seed includes, so that the batches of a set get different draws."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= len(PARAMETERS[name]):
        raise ValueError(f"severity must be 1 to {len(PARAMETERS[name])}, got {severity}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N,3,S,S), got {images.dtype} {tuple(images.shape)}")
    param = PARAMETERS[name][severity - 1]
    args = param if isinstance(param, tuple) else (param,)
    with _seeded_rng(_seed(seed, name, severity, start), images.device), torch.no_grad():
        out = _FUNCTIONS[name](images.float() / 255, *args)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def corrupt_batches(
    pixels: np.ndarray, name: str, severity: int, seed: int, device: torch.device | str, batch: int = BATCH
) -> Iterator[torch.Tensor]:
    """uint8 (N,S,S,3) numpy, as datasets hold them -> corrupted uint8 (B,3,S,S) batches on `device`, in order."""
    device = torch.device(device)
    for start in range(0, len(pixels), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch])).to(device).permute(0, 3, 1, 2)
        yield corrupt(chunk.contiguous(), name, severity, seed, start)
