"""Batched augmentation on the training device, from uint8 pixels (no per-image Python work).

train_view: the labelled images as a run trains on them, by `--augment`:
        default: the weak view; robust: the weak view, then robust_augment.robust_view (AugMix-style mix and
        training-only noise); none: unchanged
weak:   random translation up to 1/8 of the side (safe for digits and clothing: no flips, no rotations)
strong: translation, rotation ±15°, scale 0.9-1.1, brightness/contrast jitter, and one cutout square
        (FixMatch's strong view, in a form that runs as a handful of tensor ops on GPU or CPU)

All randomness comes from one torch.Generator on the training device whose state is checkpointed, so a
resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transferkit.training.robust_augment import robust_view


def _affine(x: torch.Tensor, gen: torch.Generator, shift: float, degrees: float, scale: float) -> torch.Tensor:
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen, device=gen.device).to(x.device)
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    s = 1.0 + (u[:, 1] * 2 - 1) * scale
    tx, ty = (u[:, 2] * 2 - 1) * shift * 2, (u[:, 3] * 2 - 1) * shift * 2  # grid units span 2 per side
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def weak_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x: float (N,3,S,S) in 0..1 -> randomly shifted copy."""
    return _affine(x, gen, shift=0.125, degrees=0.0, scale=0.0)


def strong_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    x = _affine(x, gen, shift=0.125, degrees=15.0, scale=0.1)
    u = torch.rand(n, 4, generator=gen, device=gen.device).to(x.device)
    brightness = (u[:, 0] * 0.8 + 0.6).view(n, 1, 1, 1)  # 0.6..1.4
    contrast = (u[:, 1] * 0.8 + 0.6).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    # cutout: one square of side S/4 to S/2 at a random place, filled with grey
    side = (u[:, 2] * 0.25 + 0.25) * min(h, w)
    cy, cx = u[:, 3] * h, torch.rand(n, generator=gen, device=gen.device).to(x.device) * w
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = (side / 2).view(n, 1, 1)
    hole = ((ys - cy.view(n, 1, 1)).abs() < half) & ((xs - cx.view(n, 1, 1)).abs() < half)
    x = torch.where(hole.unsqueeze(1), torch.full_like(x, 0.5), x)
    return x.clamp_(0.0, 1.0)


def train_view(x: torch.Tensor, gen: torch.Generator, augment: str, severity: int = 3) -> torch.Tensor:
    """x: float (N,3,S,S) in 0..1 -> the labelled images' training view for TrainConfig.augment (and, for robust,
    augment_severity)."""
    if augment == "none":
        return x
    x = weak_view(x, gen)
    if augment == "robust":
        x = robust_view(x, gen, severity)
    return x


def to_unit(batch_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N,3,S,S) -> float (N,3,S,S) in 0..1."""
    return batch_uint8.float().div_(255.0)
