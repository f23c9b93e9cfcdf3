"""Training: a shared backbone with one head per label space, multi-dataset sampling, pseudo-labels,
fine-tune schedules, exact resume, torchrun; evaluation across every dataset a head can score."""

from transferkit.training.trainer import resume, train

__all__ = ["resume", "train"]
