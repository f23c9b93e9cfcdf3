"""Batched inference and accuracy, shared by validation during training and `transferkit eval`."""

from __future__ import annotations

import numpy as np
import torch

from transferkit.preprocess import Preprocessing
from transferkit.training.precision import forward


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    pre: Preprocessing,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    heads: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """uint8 images (N,S,S,3) numpy or (N,3,S,S) tensor -> {head: float32 logits (N, classes)}."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        x = torch.as_tensor(chunk).to(device, non_blocking=True)
        if x.shape[-1] == 3:  # NHWC numpy layout
            x = x.permute(0, 3, 1, 2)
        logits = forward(model, pre, x)
        for name, value in logits.items():
            if heads is None or name in heads:
                out.setdefault(name, []).append(value.float().cpu().numpy())
    model.train(was_training)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm
