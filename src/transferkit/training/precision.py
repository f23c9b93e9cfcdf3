"""How every training-side forward pass feeds the model: the pixels normalised by the run's preprocessing in
channels_last layout, under bf16 autocast on CUDA. One place, so that the trainer, evaluation, distillation's
teachers, adaptation and the self-training rounds cannot drift apart (the export's reference logits come from
the same preprocessing in fp32, see export/verify.py)."""

from __future__ import annotations

import contextlib

import torch

from transferkit.preprocess import Preprocessing


def model_input(pre: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """(N,3,S,S) uint8, or float in 0..1 -> normalised float32, channels_last (oneDNN's and tensor cores'
    layout; the model is moved to it in setup.py)."""
    return pre.normalize_torch(images).contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; on a CPU the forward pass stays in fp32."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda")


def forward(model: torch.nn.Module, pre: Preprocessing, images: torch.Tensor):
    """`model`'s output for `images` ((N,3,S,S) uint8, or float in 0..1): `model_input`, then the forward pass
    under `autocast` on the images' device. Gradients, train or eval mode: the caller's."""
    x = model_input(pre, images)
    with autocast(x.device):
        return model(x)
