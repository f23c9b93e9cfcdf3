"""What every backbone family builds: the network without its classifier and the input its weights expect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from transferkit.errors import ConfigError
from transferkit.preprocess import Preprocessing

TIMM_PREFIX = "timm/"


def is_timm(backbone: str) -> bool:
    return backbone.startswith(TIMM_PREFIX)


@dataclass
class Backbone:
    """A model without its classifier, and the input definition its weights were trained with."""

    name: str
    module: nn.Module
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "bilinear"  # the PIL filter of the weights' own recipe (timm: its pretrained_cfg interpolation)
    native_size: int = 224  # the input side the weights were trained at (`--image-size auto`)
    weights: dict[str, Any] = field(default_factory=dict)  # where the weights came from (weights.json in a run)

    def preprocessing(self, image_size: int) -> Preprocessing:
        return Preprocessing(image_size=image_size, mean=self.mean, std=self.std, resize=self.resize, jpeg_draft=True)

    @torch.no_grad()
    def check_input_size(self, image_size: int) -> None:
        """A dry forward pass, so a backbone that cannot take this input size (ViT and Swin want 224 px, say)
        is refused with the reason before any data is loaded, not deep inside the first training step."""
        was_training = self.module.training
        self.module.eval()
        try:
            self.module(torch.zeros(1, 3, image_size, image_size))
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"backbone {self.name} cannot take {image_size}px inputs ({str(exc).splitlines()[0]}); "
                f"pick another --image-size (its weights were trained at {self.native_size}: --image-size auto) "
                f"or another backbone"
            ) from None
        finally:
            self.module.train(was_training)
