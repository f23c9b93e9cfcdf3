"""`--augment robust`: an AugMix-style mix and training-only noise, batched on the training device.

    x = robust_view(x, gen)   # float (N,3,S,S) in 0..1 -> the same shape, dtype and range

AugMix (Hendrycks, Mu et al., ICLR 2020): every image gets WIDTH chains of 1 to DEPTH operations, each operation
drawn per image and per step of the chain, with a magnitude drawn up to severity / 10 of its maximum; the chains
are mixed by Dirichlet(1) weights and the mix is blended with the image by a Beta(1, 1) share. The operations are
AugMix's own (autocontrast, equalize, posterize, solarize, rotate, shear x/y, translate x/y): chosen in its paper
to be disjoint from the common corruptions, so they teach no corruption the evaluation then scores
(evaluation/corruptions.py). AugMix's paper leaves out brightness, contrast, colour and sharpness for that reason,
and so does this.

Training-only noise: after the mix, NOISE_SHARE of the images get one of two noises that the evaluation does not
use: uniform noise added to every channel value (the evaluation's is Gaussian and Poisson) or grey salt and pepper
that replaces whole pixels (the evaluation's impulse noise replaces single channel values, so its specks are
coloured). They are of the evaluation's noise family, not its corruptions: docs/robustness.md reports mCA over the
families the training never touches apart from the noise family, so the two kinds of gain can be told apart.

Where the pieces come from: equalize, posterize and solarize are kornia's (batched, a parameter per image),
autocontrast is torchvision's (batched); the geometric operations are one affine grid per image through torch's
grid_sample, as augment.py's shifts; the chains, the mix and the noises are written here. torchvision's AugMix
transform would be the maintained whole, but on a batch it applies one chain of operations to every image, and it
draws from the global RNG: per-image chains would mean a Python loop over the images, and its draws would not
follow the run's generator, which a resumed run must replay.

Every random number comes from `gen` (the run's augmentation generator, checkpointed), in an order that depends on
the batch's size only, never on its pixels: a resumed run draws what an uninterrupted one does. With
`--robust-views K` (consistency.py) the image's shifted view stays in the batch beside K of these views, and
AugMix's Jensen-Shannon consistency among them is an option there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

WIDTH = 3  # chains per image (AugMix's default)
DEPTH = 3  # operations per chain: 1 to DEPTH, drawn per chain and image (AugMix's default)
SEVERITY = 3  # magnitudes up to severity / 10 of each operation's maximum (AugMix's default; --augment-severity)
NOISE_SHARE = 0.5  # images that get a training-only noise after the mix
UNIFORM_NOISE_MAX = 0.15  # largest half-width of the uniform noise, on the 0..1 scale
SALT_PEPPER_MAX = 0.06  # largest share of pixels set to black or white


def _uniform(gen: torch.Generator, *shape: int, like: torch.Tensor) -> torch.Tensor:
    """Uniform 0..1 numbers from the run's generator (on its device), moved to the images' device."""
    return torch.rand(*shape, generator=gen, device=gen.device).to(device=like.device, dtype=like.dtype)


def _geometry(which: torch.Tensor, level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The affine map of each image's geometric operation (the identity for the others), (N,2,3): output grid ->
    input grid in normalised coordinates, which span 2 per side. At most one term is not zero per image."""

    def of(name: str) -> torch.Tensor:
        return torch.where(which == GEOMETRIC.index(name) + len(INTENSITY), level, torch.zeros_like(level))

    angle = torch.deg2rad(of("rotate") * 30.0)  # AugMix: up to 30 degrees at severity 10
    shear_x, shear_y = of("shear_x") * 0.3, of("shear_y") * 0.3  # AugMix: shear factor up to 0.3
    shift_x, shift_y = of("translate_x") * 2 / 3, of("translate_y") * 2 / 3  # AugMix: up to a third of the side
    cos, sin = torch.cos(angle), torch.sin(angle)
    rows = [torch.stack([cos, shear_x - sin, shift_x], 1), torch.stack([sin + shear_y, cos, shift_y], 1)]
    return torch.stack(rows, 1).to(like.dtype)


def _grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """F.affine_grid(theta, (N,C,S,S), align_corners=False) as three multiply-adds per point: the same grid, without
    affine_grid's batched matrix product, which costs more than the sampling itself at 32 px on a CPU."""
    centres = (torch.arange(side, device=theta.device, dtype=theta.dtype) * 2 + 1) / side - 1
    xs, ys = centres.view(1, 1, side), centres.view(1, side, 1)
    t = theta.view(-1, 6, 1, 1).unbind(1)
    return torch.stack([t[0] * xs + t[1] * ys + t[2], t[3] * xs + t[4] * ys + t[5]], dim=-1)


def _autocontrast(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    import torchvision.transforms.v2.functional as TF

    return TF.autocontrast(x)


def _equalize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    from kornia.enhance import equalize

    return equalize(x.clamp(0.0, 1.0))


def _posterize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    from kornia.enhance import posterize

    bits = 4 - (level.abs() * 4).long()  # AugMix: 4 bits, one fewer per quarter of the maximum
    return posterize(x, bits)


def _solarize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    from kornia.enhance import solarize

    return solarize(x, 1.0 - level.abs())  # AugMix: values above 1 - level are inverted


# name -> f(images, signed level): a level in (0, severity / 10], signed where the operation has a direction
INTENSITY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "posterize": _posterize,
    "solarize": _solarize,
}
# one affine grid per image, all of them in one grid_sample (_geometry)
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPERATIONS = (*INTENSITY, *GEOMETRIC)


def _operation_step(x: torch.Tensor, gen: torch.Generator, severity: int) -> torch.Tensor:
    """One operation per image, each with its own magnitude and direction."""
    n = len(x)
    u = _uniform(gen, n, 3, like=x)
    which = (u[:, 0] * len(OPERATIONS)).long().clamp_max(len(OPERATIONS) - 1)
    level = (0.1 + u[:, 1] * (severity - 0.1)) / 10  # AugMix's sample_level: uniform in (0.1, severity), / 10
    level = torch.where(u[:, 2] < 0.5, -level, level)
    grid = _grid(_geometry(which, level, x), x.shape[-1])
    # black outside the image, as AugMix's PIL operations fill
    moved = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = torch.where((which >= len(INTENSITY)).view(n, 1, 1, 1), moved, x)
    for k, operation in enumerate(INTENSITY.values()):  # each on its own images only (equalize is not cheap)
        rows = (which == k).nonzero().squeeze(1)
        if len(rows):
            out[rows] = operation(x[rows], level[rows])
    return out


def augmix(x: torch.Tensor, gen: torch.Generator, severity: int = SEVERITY) -> torch.Tensor:
    """AugMix's mix of WIDTH chains, blended with the image (see the module docstring)."""
    n = len(x)
    # Dirichlet(1, ..., 1) weights as normalised exponentials, and Beta(1, 1) = uniform: drawn from `gen`,
    # which torch.distributions cannot take
    chain_weights = -torch.log(_uniform(gen, n, WIDTH, like=x).clamp_min(1e-12))
    chain_weights = chain_weights / chain_weights.sum(1, keepdim=True)
    keep = _uniform(gen, n, like=x).view(n, 1, 1, 1)
    depths = 1 + (_uniform(gen, n, WIDTH, like=x) * DEPTH).long().clamp_max(DEPTH - 1)
    mixed = torch.zeros_like(x)
    for chain in range(WIDTH):
        aug = x
        for step in range(DEPTH):  # every step is drawn for every image, so the draws do not depend on depths
            stepped = _operation_step(aug, gen, severity)
            aug = stepped if step == 0 else torch.where((step < depths[:, chain]).view(n, 1, 1, 1), stepped, aug)
        mixed += chain_weights[:, chain].view(n, 1, 1, 1) * aug
    return keep * x + (1 - keep) * mixed


def training_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """NOISE_SHARE of the images get uniform noise or grey salt and pepper, at a strength drawn per image."""
    n = len(x)
    u = _uniform(gen, n, 3, like=x)
    noisy, salty = u[:, 0] < NOISE_SHARE, u[:, 1] < 0.5
    field = _uniform(gen, *x.shape, like=x)
    spots = _uniform(gen, n, 1, *x.shape[2:], like=x)  # one draw per pixel: all channels alike (grey)
    half_width = (u[:, 2] * UNIFORM_NOISE_MAX).view(n, 1, 1, 1)
    uniform = x + (field * 2 - 1) * half_width
    rate = (u[:, 2] * SALT_PEPPER_MAX).view(n, 1, 1, 1)
    salt_pepper = torch.where(spots < rate, (spots < rate / 2).to(x.dtype), x)  # half black, half white
    noise = torch.where(salty.view(n, 1, 1, 1), salt_pepper, uniform)
    return torch.where(noisy.view(n, 1, 1, 1), noise, x)


def robust_view(x: torch.Tensor, gen: torch.Generator, severity: int = SEVERITY) -> torch.Tensor:
    """float (N,3,S,S) in 0..1 -> AugMix's mix at `severity`, then training-only noise on some images; same shape
    and dtype."""
    if not len(x):
        return x
    return training_noise(augmix(x, gen, severity), gen).clamp_(0.0, 1.0)
