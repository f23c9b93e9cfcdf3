"""Pretrained backbones: a network without its ImageNet classifier, the input it expects, and where its weights came from.

Two families, named by the backbone string:
- `mobilenet_v2`, `resnet18`, ...: a torchvision classification model (torchvision_models.py);
- `timm/NAME`: any timm classification model (timm_models.py), its mean, std, interpolation and input size taken
  from its `pretrained_cfg`.

Weights (`--weights`): `imagenet` (the family's default ImageNet weights, from torch's or Hugging Face's hub cache),
`none` (random init), a weights name of that family (a torchvision enum name such as IMAGENET1K_V2, or a timm
pretrained tag such as `ra_in1k`), or a local file (weights_file.py: state dict or checkpoint, .pth/.pt/.bin/
.safetensors), whose sha256 the run records.
"""

from __future__ import annotations

from pathlib import Path

from transferkit.backbones import timm_models, torchvision_models
from transferkit.backbones.base import TIMM_PREFIX, Backbone, is_timm
from transferkit.backbones.weights_file import looks_like_path
from transferkit.errors import ConfigError


def create_backbone(backbone: str, weights: str) -> Backbone:
    """Build `backbone` with `weights`, its classifier replaced by an identity (features out)."""
    return _family(backbone).create(backbone, weights)


def check_backbone(backbone: str, weights: str) -> None:
    """Refuse an unknown backbone or weights before training starts (no weights are read)."""
    if is_weights_file(weights) and not Path(weights).expanduser().is_file():
        raise ConfigError(f"weights file {weights} not found; pass an existing file, imagenet or none to --weights")
    _family(backbone).check(backbone, weights)


def native_input_size(backbone: str, weights: str) -> int:
    """The square input side the backbone's weights were trained at: what `--image-size auto` picks."""
    return _family(backbone).native_size(backbone, weights)


def is_weights_file(weights: str) -> bool:
    return looks_like_path(weights)


def _family(backbone: str):
    return timm_models if is_timm(backbone) else torchvision_models


__all__ = [
    "TIMM_PREFIX",
    "Backbone",
    "check_backbone",
    "create_backbone",
    "is_timm",
    "is_weights_file",
    "native_input_size",
]
