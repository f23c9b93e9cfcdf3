"""A shared pretrained backbone with one linear head per label space, and the graph that is exported.

The backbone (backbones/: a torchvision or timm model without its classifier) returns features, and those are
the input of our heads. Like timm's `pretrained_cfg`, the model carries its input definition
(`model.preprocessing`): mean/std/interpolation come from the weights' own recipe, never re-typed, so no caller
has to pass them along.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from transferkit.backbones import Backbone, create_backbone


def head_name(dataset_name: str) -> str:
    """A dataset name as a head key: usable in nn.ModuleDict, ONNX output names and JSON."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", dataset_name).strip("_") or "head"


class MultiHeadModel(nn.Module):
    """backbone(x) -> features (N, D); heads[name](features) -> logits (N, classes of that head).

    `preprocessing` is the input definition the model expects (size, mean/std); `class_names` the labels of
    each head's logits. Neither is in the state dict: a run directory stores them beside model.pt."""

    def __init__(self, backbone: Backbone, heads: dict[str, list[str]], image_size: int):
        super().__init__()
        self.backbone = backbone.module
        self.feature_dim = backbone.feature_dim
        self.preprocessing = backbone.preprocessing(image_size)
        self.class_names = {name: list(classes) for name, classes in heads.items()}
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(c)) for name, c in heads.items()})

    @property
    def head_names(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        return {name: head(feats) for name, head in self.heads.items()}


class ExportModule(nn.Module):
    """The graph that is exported: one input `images`, one logits output per head, in a fixed order."""

    def __init__(self, model: MultiHeadModel):
        super().__init__()
        self.model = model
        self.order = model.head_names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return tuple(out[name] for name in self.order)


def build_model(backbone: str, weights: str, heads: dict[str, list[str]], image_size: int) -> MultiHeadModel:
    """A backbone with fresh heads; `model.preprocessing` holds the mean/std of `weights` at `image_size`."""
    return MultiHeadModel(create_backbone(backbone, weights), heads, image_size)
