"""Optimisation: parameter groups with layer-wise lr decay, warm-up + cosine schedule, freezing.

Layer-wise decay needs the backbone's depth order for *any* torchvision model. Parameters are registered
in forward order, so grouping them by "block" (the name up to its first numeric index, e.g.
`features.3`, `layer2.1`, or the top-level module `conv1`) gives blocks from stem to top. The heads get the
full lr; block k of K gets lr * decay^(K - k).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from transferkit.model import MultiHeadModel


def block_key(param_name: str) -> str:
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else param_name


def backbone_blocks(backbone: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Backbone parameters grouped by block, stem first."""
    blocks: dict[str, list] = {}
    for name, p in backbone.named_parameters():
        blocks.setdefault(block_key(name), []).append((name, p))
    return list(blocks.values())


def param_groups(model: MultiHeadModel, lr: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors); lr scaled per block."""
    groups: list[dict] = []

    def add(params: list[tuple[str, nn.Parameter]], scale: float, tag: str) -> None:
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr * scale, "weight_decay": wd, "lr_scale": scale, "name": tag})

    blocks = backbone_blocks(model.backbone)
    depth = len(blocks)
    for k, block in enumerate(blocks):
        scale = layer_decay ** (depth - k) if layer_decay else 1.0
        add(block, scale, f"backbone.{block_key(block[0][0])}")
    add(list(model.heads.named_parameters()), 1.0, "heads")
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int):
    """lr multiplier: linear 0 -> 1 over warm-up, then cosine 1 -> 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def set_backbone_frozen(model: MultiHeadModel, frozen: bool) -> None:
    """Frozen: no gradients for the backbone, and its BatchNorm/Dropout in eval mode (statistics fixed).
    Call after model.train(), which would otherwise flip the backbone back to train mode."""
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()


class EMA:
    """Exponential moving average of parameters and buffers; `decay` per optimiser step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.float_keys = [k for k, v in self.state.items() if v.dtype.is_floating_point]
        self.other_keys = [k for k, v in self.state.items() if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        # one fused kernel per dtype/device group instead of one launch per tensor
        torch._foreach_lerp_(
            [self.state[k] for k in self.float_keys], [current[k] for k in self.float_keys], 1.0 - self.decay
        )
        for k in self.other_keys:
            self.state[k].copy_(current[k])

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
