"""`--adversarial-training fgsm`: the labelled images are replaced by FGSM images of themselves before the loss.

    x = fgsm_view(student, ctx, x, labels, head_ids)   # float (N,3,S,S) in 0..1, augmented -> adversarial

FGSM with a random start (Wong, Rice & Kolter, ICLR 2020, "Fast is better than free"): a uniform start in the
L-infinity ball of radius eps around the augmented image, one signed-gradient step of 1.25 eps, projected back
into the ball and into [0, 1]. That is evaluation/attacks.py's PGD with one step of 1.25 eps, so training and
`transferkit eval --attack` share one implementation of the arithmetic. The start is drawn from the run's
augmentation generator, so a resumed run draws what an uninterrupted one does.

Each image is attacked through its own head's loss (the training loss itself, masked per head), on the model as
it is in this step: train mode, so BatchNorm normalises with the batch's statistics as the training pass will;
the running statistics and every other buffer are left as they were, so the extra pass does not count as a
training batch. It runs on the model without the loop's DDP or compile wrapper: it needs the input's gradient,
not the weights'. Cost: one more forward and backward pass per step, about twice the time of plain training.
The loss is then taken on the adversarial images only, as in Wong et al.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from transferkit.config import adversarial_eps
from transferkit.evaluation.attacks import pgd
from transferkit.training.losses import masked_head_losses
from transferkit.training.precision import forward

STEP = 1.25  # the gradient step, in units of eps (Wong et al.)


@contextlib.contextmanager
def batchnorm_statistics_kept(model: nn.Module):
    """BatchNorm in train mode normalises with the batch's statistics, and its running statistics and batch count
    come back as they were afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(m, name).copy_(value)


def fgsm_view(student: nn.Module, ctx, x: torch.Tensor, labels: torch.Tensor, head_ids: torch.Tensor) -> torch.Tensor:
    """x: the augmented labelled images, float (N,3,S,S) in 0..1 -> their FGSM images at the run's eps.
    `ctx`: the step's StepContext (heads, weights, preprocessing, the augmentation generator)."""
    cfg = ctx.config
    eps = adversarial_eps(cfg)

    def loss_of(images: torch.Tensor) -> torch.Tensor:
        logits = forward(student, ctx.preprocessing, images)
        loss, _ = masked_head_losses(
            logits, labels, head_ids, ctx.head_order, ctx.head_weights, ctx.class_weights, cfg.label_smoothing
        )
        return loss

    with batchnorm_statistics_kept(student):
        return pgd(loss_of, x, eps, steps=1, step_size=STEP * eps, generator=ctx.aug_gen)
