"""Adapting to the unlabeled (target) images beyond plain FixMatch: who labels the weak view, and with which
BatchNorm statistics. Self-training rounds are in rounds.py.

- AdaBN (`adapt_bn`). A source-trained network normalises target images with source statistics, and its
  features drift off the distribution its head knows. The pseudo-labeller therefore sees the weak target
  batch on its own, with BatchNorm normalising by that batch's statistics (AdaBN's target statistics,
  estimated per batch) and its running statistics untouched. The saved model keeps the statistics of the
  mixed training batches: it serves the source datasets too, and re-estimating them on target images
  costs the source most of its accuracy (docs/adaptation.md). Between rounds the whole target set is
  labelled after `adapt_batchnorm` on it, on a copy of the model.
- Mean teacher (`teacher_ema`). The weak view is labelled by an exponential moving average of the weights,
  which changes more slowly than the student, so one bad step does not flip the labels it trains on. The
  teacher starts as a copy of the student when pseudo-labels start (earlier weights know the labelled data
  less well), then follows it every optimiser step.

Either way the labeller runs without gradients on the weak view only, so the student's forward and backward
carry the labelled batch and the strong view, not the weak view as well.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from transferkit.preprocess import Preprocessing
from transferkit.training import augment
from transferkit.training.optim import EMA
from transferkit.training.precision import forward, model_input


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Within: BatchNorm layers normalise with the statistics of the batch they see and leave their running
    statistics (and counters) alone; every other layer is in eval mode, so dropout draws no random numbers
    and an exactly resumed run stays exact."""
    modes = [(m, m.training) for m in model.modules()]
    norms = batchnorms(model)
    tracked = [m.track_running_stats for m in norms]
    model.eval()
    for m in norms:
        m.train()
        m.track_running_stats = False  # train mode without running buffers: batch statistics, no update
    try:
        yield model
    finally:
        for m, t in zip(norms, tracked):
            m.track_running_stats = t
        for m, mode in modes:
            m.training = mode


def _inputs(batch_uint8: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    return model_input(pre, augment.to_unit(batch_uint8))


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], pre: Preprocessing) -> int:
    """AdaBN: every BatchNorm's running mean and variance become the average over `batches` (uint8 NCHW
    images on the model's device, un-augmented) -> images seen. Weights and every other buffer keep their
    values; dropout stays off."""
    norms = batchnorms(model)
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an exponential one
        m.train()
    seen = 0
    try:
        for images in batches:
            if len(images):
                model(_inputs(images, pre))
                seen += len(images)
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
        for m, mode in modes:
            m.training = mode
    return seen


class PseudoLabeller:
    """Who labels the weak view of the unlabeled images in a training step (see the module docstring).

    Off (`teacher_ema` 0 and `adapt_bn` off): None from `weak_logits`, and the trainer labels the weak view in
    the student's own batch, as plain FixMatch does."""

    def __init__(self, model: nn.Module, pre: Preprocessing, teacher_ema: float, adapt_bn: bool):
        self.pre, self.adapt_bn = pre, adapt_bn
        self.teacher: nn.Module | None = None
        self.ema: EMA | None = None
        if teacher_ema > 0:
            self.teacher = copy.deepcopy(model).requires_grad_(False)
            self.ema = EMA(self.teacher, teacher_ema)
            self.ema.state = self.teacher.state_dict()  # the average lives in the teacher's own tensors
        self.started = False  # the teacher is a copy of the student from the first pseudo-labelled step on

    @classmethod
    def for_run(cls, config, model: nn.Module, pre: Preprocessing) -> PseudoLabeller:
        """The labeller a run's config asks for; no teacher copy where nothing is pseudo-labelled."""
        labels = bool(config.unlabeled) and not config.teachers
        return cls(model, pre, config.teacher_ema if labels else 0.0, config.adapt_bn)

    @property
    def active(self) -> bool:
        return self.teacher is not None or self.adapt_bn

    @torch.no_grad()
    def weak_logits(self, student: nn.Module, weak_unit: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Logits for the weak view (float 0..1, N,3,S,S), or None when the student labels it in its batch."""
        if not self.active:
            return None
        if self.teacher is not None and not self.started:
            self.teacher.load_state_dict(student.state_dict())
            self.started = True
        model = self.teacher if self.teacher is not None else student
        if self.adapt_bn:
            with batch_statistics(model):
                return forward(model, self.pre, weak_unit)
        was_training = model.training
        model.eval()
        try:
            return forward(model, self.pre, weak_unit)
        finally:
            model.train(was_training)

    def update(self, student: nn.Module) -> None:
        """After each optimiser step: the teacher moves towards the student (once pseudo-labels have started)."""
        if self.ema is not None and self.started:
            self.ema.update(student)

    def state_dict(self) -> dict | None:
        if self.teacher is None:
            return None
        return {"started": self.started, "teacher": self.ema.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        if self.teacher is None or not state:
            return
        self.ema.load_state_dict(state["teacher"])
        self.started = bool(state["started"])
