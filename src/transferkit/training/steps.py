"""Training steps as objects: what one micro-batch's forward and backward pass computes, for each kind of run.

Every step has one shape, `forward_backward(model, batch, ctx) -> stats`:

- `model`: the model being trained, as the loop runs it (DDP- and/or compile-wrapped);
- `batch`: a MicroBatch, this process's labelled images (and unlabeled ones, when the run has them);
- `ctx`: a StepContext, what else the losses read: the run's config, the setup's heads and weights, the
  augmentation generator and how far training has come.

It backpropagates the micro-batch's share of the optimiser step's mean loss and returns its sums as device
tensors (the loop reads them only every few steps: reading forces a sync): `correct`, `seen` (labelled images),
`images` (all images through the model) and `loss`; pseudo-labelling adds `unl`, `kept`, `kept_right`,
distillation `kd`. TrainLoop (trainer.py) picks one step when it is built and owns the optimiser step around it.

- SupervisedStep: cross-entropy on the labelled images (on FGSM images of them with --adversarial-training fgsm,
  adversarial.py; with --robust-views K on their shifted view and K robust views of it, plus AugMix's consistency
  among them with --consistency-weight, consistency.py), and FixMatch on the unlabeled ones once their ramp has
  started: the weak view's confident predictions are the targets of the strong view. The weak view is labelled
  by a PseudoLabeller (mean teacher, AdaBN: adaptation.py), or in the student's own batch as plain FixMatch does.
- DistillationStep: the teachers' soft targets on every image, cross-entropy on the labelled ones (distill.py).

Each forward pass goes through precision.forward, and every random number comes from ctx.aug_gen in a fixed
order (the labelled images' view, their FGSM start, then the unlabeled images' weak and strong views), so a resumed
run draws the augmentations an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch
from torch import nn

from transferkit.config import TrainConfig
from transferkit.preprocess import Preprocessing
from transferkit.training import adversarial, augment, consistency
from transferkit.training.adaptation import PseudoLabeller
from transferkit.training.distill import Teacher, distillation_loss, soft_targets
from transferkit.training.losses import DistributionAlignment, masked_head_losses, pseudo_label_loss
from transferkit.training.precision import forward
from transferkit.training.setup import TrainingSetup

Images = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 (N,3,S,S) images, labels, head ids


def unlabeled_ramp(step: int, total: int, start: float, rampup: float) -> float:
    """Weight multiplier of the pseudo-label loss: 0 before `start`, then linear to 1 over `rampup`
    (both fractions of all steps)."""
    begin, length = start * total, rampup * total
    if step < begin:
        return 0.0
    return 1.0 if length <= 0 else min(1.0, (step - begin) / length)


class MicroBatch(NamedTuple):
    labelled: Images
    unlabeled: Images | None  # the unlabeled images' labels are their true ones where known (reports only), else -1
    step_images: int  # labelled images in this process's whole optimiser step (grad_accum micro-batches)

    @property
    def share(self) -> float:
        """This micro-batch's share of the step's mean loss."""
        return len(self.labelled[0]) / max(self.step_images, 1)


@dataclass(frozen=True)
class StepContext:
    """What a step reads besides the model and the batch; fixed for a run but for `global_step`."""

    config: TrainConfig
    preprocessing: Preprocessing
    head_order: list[str]
    head_weights: list[float]
    class_weights: list[torch.Tensor | None]
    alignment: DistributionAlignment | None  # of the pseudo-labels' class frequencies; None: off
    aug_gen: torch.Generator  # on the training device, checkpointed with the run
    total_steps: int
    global_step: int = 0

    @classmethod
    def of(cls, setup: TrainingSetup, aug_gen: torch.Generator) -> StepContext:
        return cls(
            setup.config,
            setup.preprocessing,
            setup.head_order,
            setup.head_weights,
            setup.class_weights,
            setup.alignment,
            aug_gen,
            setup.total_steps,
        )

    def at(self, global_step: int) -> StepContext:
        return replace(self, global_step=global_step)

    def weak_view(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """The labelled images as the model trains on them: 0..1, augmented as the run's `augment` says."""
        cfg = self.config
        return augment.train_view(augment.to_unit(images_uint8), self.aug_gen, cfg.augment, cfg.augment_severity)


class TrainingStep(Protocol):
    def forward_backward(self, model: nn.Module, batch: MicroBatch, ctx: StepContext) -> dict: ...


class SupervisedStep:
    """Cross-entropy on the labelled images, and FixMatch on the unlabeled ones (see the module docstring)."""

    def __init__(self, labeller: PseudoLabeller, student: nn.Module):
        self.labeller = labeller
        # The model itself, without the loop's DDP/compile wrapper: the labeller runs it without gradients,
        # outside the training pass those wrappers are for.
        self.student = student

    def forward_backward(self, model: nn.Module, batch: MicroBatch, ctx: StepContext) -> dict:
        cfg = ctx.config
        images, labels, head_ids = batch.labelled
        k = cfg.robust_views
        if k:
            x = consistency.shifted_and_robust_views(images, ctx.aug_gen, cfg.augment_severity, k)
        else:
            x = ctx.weak_view(images)
        if cfg.adversarial_training == "fgsm":  # the loss is taken on FGSM images of the augmented view
            x = adversarial.fgsm_view(self.student, ctx, x, labels, head_ids)
        parts = [x]
        ramp = unlabeled_ramp(ctx.global_step, ctx.total_steps, cfg.unlabeled_start, cfg.unlabeled_rampup)
        unlabeled = batch.unlabeled
        if unlabeled is not None and len(unlabeled[0]) and ramp > 0:  # no wasted forward before the start
            u_images, u_true, u_heads = unlabeled
            u = augment.to_unit(u_images)
            weak_view, strong_view = augment.weak_view(u, ctx.aug_gen), augment.strong_view(u, ctx.aug_gen)
            # labelled apart (no gradient) by the labeller, or in this batch as plain FixMatch does
            labeller_logits = self.labeller.weak_logits(self.student, weak_view)
            parts += [strong_view] if labeller_logits is not None else [weak_view, strong_view]
        logits = forward(model, ctx.preprocessing, torch.cat(parts))
        n, views = len(images), len(x)  # views: n, or (K + 1) n with --robust-views K
        lab = {h: v[:views] for h, v in logits.items()}
        loss, correct = masked_head_losses(
            lab,
            labels.repeat(k + 1),
            head_ids.repeat(k + 1),
            ctx.head_order,
            ctx.head_weights,
            ctx.class_weights,
            cfg.label_smoothing,
        )
        if cfg.consistency_weight:
            loss = loss + cfg.consistency_weight * consistency.js_consistency(
                lab, head_ids, ctx.head_order, ctx.head_weights, k + 1
            )
        stats = {"correct": correct[:n].sum(), "seen": n, "images": views}  # accuracy of the shifted view
        if len(parts) > 1:
            m = len(u_images)
            if labeller_logits is not None:
                weak, strong = labeller_logits, {h: v[views:] for h, v in logits.items()}
            else:
                weak = {h: v[views : views + m] for h, v in logits.items()}
                strong = {h: v[views + m :] for h, v in logits.items()}
            u_loss, keep, pseudo = pseudo_label_loss(
                weak, strong, u_heads, ctx.head_order, cfg.pseudo_threshold, ctx.alignment
            )
            loss = loss + cfg.unlabeled_weight * ramp * u_loss
            stats.update(images=views + m, unl=m, kept=keep.sum(), kept_right=(keep & (pseudo == u_true)).sum())
        (loss * batch.share).backward()
        stats["loss"] = loss.detach() * batch.share
        return stats


class DistillationStep:
    """Soft targets from `teachers` on every image (labelled and unlabeled), on the very view the student is
    scored on, plus cross-entropy on the labelled images; the stats add `kd`, the KD part before kd_weight."""

    def __init__(self, teachers: list[Teacher]):
        self.teachers = teachers

    def forward_backward(self, model: nn.Module, batch: MicroBatch, ctx: StepContext) -> dict:
        cfg = ctx.config
        images, labels, head_ids = batch.labelled
        n = len(images)
        if batch.unlabeled is not None and len(batch.unlabeled[0]):  # no labels and no head: the teachers teach
            u_images, u_labels, u_heads = batch.unlabeled
            images = torch.cat([images, u_images])
            labels = torch.cat([labels, torch.full_like(u_labels, -1)])
            head_ids = torch.cat([head_ids, torch.full_like(u_heads, -1)])
        x = ctx.weak_view(images)
        targets = soft_targets(self.teachers, x, cfg.temperature)  # the same view, at each teacher's size
        logits = forward(model, ctx.preprocessing, x)
        loss, kd, correct = distillation_loss(
            logits,
            targets,
            labels,
            head_ids,
            ctx.head_order,
            ctx.head_weights,
            ctx.class_weights,
            cfg.temperature,
            cfg.kd_weight,
            cfg.label_smoothing,
        )
        (loss * batch.share).backward()
        return {
            "correct": correct[:n].sum(),
            "seen": n,
            "images": len(images),
            "loss": loss.detach() * batch.share,
            "kd": kd.detach() * batch.share,
        }
