"""Quantization-aware fine-tuning: a model with NNCF's fake quantizers trained a little further on the run's data.

Post-training INT8 fixes the weights and picks each tensor's range from calibration images; where that loses
accuracy (depthwise convolutions, small heads), a few hundred steps with the quantizers in the forward pass let
the weights and the ranges adapt to each other (NNCF's QAT: straight-through gradients, learnable ranges).

What it trains on is the run's own: its datasets (only their train splits: the validation split chooses among
INT8 attempts and the test split gates the result), its heads, its sampler's mix, its preprocessing and its
augmentation, through the same supervised step as training (training/steps.py), so `--robust-views` and
`--adversarial-training` runs keep their objective. What differs from training, and why:

- a small learning rate (QAT_LR_FACTOR of the run's), cosine to zero, no weight decay: the model is already
  trained, the quantizers only need the weights nudged;
- BatchNorm statistics frozen (its layers in eval mode): the ranges were calibrated on those statistics, and
  a few small CPU batches would move them more than they should;
- no unlabeled data, teachers or EMA: the step learns from the labelled images only;
- bounded by steps and by seconds: the first step is timed and the run planned to fit (`finetune`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferkit.errors import TransferkitError
from transferkit.training.optim import warmup_cosine
from transferkit.training.setup import TrainingSetup, build_setup
from transferkit.training.steps import MicroBatch, StepContext, SupervisedStep

QAT_BATCH_PIXELS = 32 * 224 * 224  # batch 32 at 224 px, the run's own batch (up to 1568) at 32 px
AUTO_BATCH_CEILING = 128  # for a run whose config still says auto (batch 0)
QAT_LR_FACTOR = 0.01  # of the run's learning rate: 1e-3 -> 1e-5, as NNCF's QAT examples fine-tune
QAT_MIN_STEPS = 20  # fewer steps than this are not run: 11 steps at 224 px gave a model worse than post-training


@dataclass
class QatReport:
    steps: int
    images: int
    seconds: float
    lr: float
    batch_size: int
    loss_first: float
    loss_last: float
    stopped: str  # why it ended: "steps" (all of max_steps) or "budget" (the steps that fit it)

    def as_dict(self) -> dict[str, Any]:
        rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}
        return {**rounded, "lr": self.lr}  # 1e-5 would round to 0


def qat_setup(config, sources: list[str], heads: dict[str, list[str]]) -> TrainingSetup:
    """The run's training pieces on the CPU for QAT: its datasets read from `sources` (where they are now), no
    unlabeled data or teachers. Refused when the heads it plans differ from the run's (a distilled student's
    heads come from its teachers, which QAT does not load)."""
    # the run's batch, at most QAT_BATCH_PIXELS of images: fake quantizers keep more activations alive than a
    # training step does, and a run trained at batch 128 at 224 px ran an export out of 24 GB in QAT
    cap = max(1, QAT_BATCH_PIXELS // (config.image_size * config.image_size))
    batch = min(config.batch_size or AUTO_BATCH_CEILING, cap)  # 0: the run left it to `auto`
    cfg = dataclasses.replace(
        config, data=list(sources), unlabeled=[], teachers=[], ema=None, compile=False, batch_size=batch
    )
    setup = build_setup(cfg, torch.device("cpu"))
    if setup.plan.labels.heads != heads:
        raise TransferkitError(
            f"quantization-aware training rebuilds heads {list(setup.plan.labels.heads)} from the run's data, "
            f"but the model has {list(heads)}; QAT cannot fine-tune this run"
        )
    return setup


def _freeze_batchnorm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class QatWontFit(TransferkitError):
    """The steps the budget allows, at the speed the first step measured, are fewer than QAT_MIN_STEPS."""


def finetune(
    model: nn.Module,
    setup: TrainingSetup,
    max_steps: int,
    budget_s: float,
    check: Callable[[], None] = lambda: None,
) -> QatReport:
    """Train `model` (the run's MultiHeadModel with quantizers inserted) for at most `max_steps` optimiser steps
    within `budget_s` seconds on `setup`'s labelled training batches; `check` runs before every step (the export's
    INT8 budget) and may raise to stop it.

    The first step measures what a step costs here, and the run is planned from it: as many steps as fit the
    budget, at most `max_steps`, with the cosine schedule over exactly those, so a short run still ends at a
    learning rate of zero (one cut short at full rate moved the weights and left them worse than post-training
    INT8). Fewer than QAT_MIN_STEPS raises QatWontFit after that one step, rather than spending the budget on
    training too short to help (at 224 px on two cores a step takes about 6 s)."""
    cfg = setup.config
    lr = cfg.lr * QAT_LR_FACTOR
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TransferkitError("the quantized model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    planned = [max_steps]  # revised after the first step; the schedule reads it at every step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(planned[0], 0)(s))
    step = SupervisedStep(labeller=None, student=model)  # type: ignore[arg-type] - no unlabeled data: never used
    generator = torch.Generator().manual_seed(cfg.seed + 7)
    context = StepContext.of(setup, generator)
    model.train()
    _freeze_batchnorm(model)
    start, done, images, losses = time.perf_counter(), 0, 0, []
    epoch = 0
    while done < planned[0]:
        for labelled in setup.pool.iterate(setup.sampler.epoch_batches(epoch)):
            if done >= planned[0]:
                break
            check()
            optimizer.zero_grad(set_to_none=True)
            stats = step.forward_backward(model, MicroBatch(labelled, None, len(labelled[0])), context.at(done))
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            losses.append(float(stats["loss"]))
            images += len(labelled[0])
            done += 1
            if done == 1:
                planned[0] = _steps_that_fit(time.perf_counter() - start, budget_s, max_steps)
        epoch += 1
    model.eval()
    return QatReport(
        steps=done,
        images=images,
        seconds=time.perf_counter() - start,
        lr=lr,
        batch_size=cfg.batch_size,
        loss_first=losses[0],
        loss_last=float(sum(losses[-10:]) / len(losses[-10:])),
        stopped="steps" if done == max_steps else "budget",
    )


def _steps_that_fit(first_step_s: float, budget_s: float, max_steps: int) -> int:
    """How many steps to run, the first included, at `first_step_s` each (it includes the first batch's data
    loading, so this errs short); QatWontFit below QAT_MIN_STEPS."""
    fit = int(budget_s / max(first_step_s, 1e-6))
    if fit < min(QAT_MIN_STEPS, max_steps):
        raise QatWontFit(
            f"a quantization-aware step takes {first_step_s:.1f} s here, so the {max(0.0, budget_s):.0f} s "
            f"the INT8 budget leaves fit {fit} steps, fewer than the "
            f"{QAT_MIN_STEPS} that help (raise --int8-budget-s)"
        )
    return min(max_steps, fit)
