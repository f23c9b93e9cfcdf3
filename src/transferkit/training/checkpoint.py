"""Training state for exact resume, written atomically (a kill mid-write leaves the previous checkpoint).

Holds everything the next step depends on: model, optimizer, scheduler, EMA, the position in the
epoch's batch order (which `MultiDatasetSampler` regenerates from the seed), the freeze stage, the
augmentation generator and the global CPU/CUDA RNG states (dropout), and the history so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferkit.utils import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state(aug_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    return atomic_write(run_dir / CHECKPOINT_NAME, lambda p: torch.save(state, p))


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    # Our own file: optimizer and RNG states are plain tensors/containers, so weights_only loading works.
    return torch.load(path, map_location="cpu", weights_only=True)


def save_weights(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """model.pt: a plain state dict on CPU, loadable with torch.load(weights_only=True)."""
    cpu = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    return atomic_write(path, lambda p: torch.save(cpu, p))
