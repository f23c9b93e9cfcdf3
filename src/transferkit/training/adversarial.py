"""Adversarial examples: FGSM and PGD, and `--adversarial-training fgsm`, which trains on FGSM images.

    adv = pgd(loss_of, x, eps, steps=10, generator=gen)   # float (N,3,S,S) in 0..1 -> adversarial images
    x = fgsm_view(student, ctx, x, labels, head_ids)      # a training step's augmented images -> FGSM images

`fgsm` and `pgd` are the arithmetic (L-infinity, on the 0..1 pixel scale); `transferkit eval --attack`
(evaluation/attacks.py) runs them too, so training and evaluation share one implementation. They live on the
training side because evaluation imports training, never the other way round.

Adversarial training uses FGSM with a random start (Wong, Rice & Kolter, ICLR 2020, "Fast is better than free"):
a uniform start in the L-infinity ball of radius eps around the augmented image, one signed-gradient step of
1.25 eps, projected back into the ball and into [0, 1]: `pgd` with one step of 1.25 eps. The start is drawn from
the run's augmentation generator, so a resumed run draws what an uninterrupted one does.

Each image is attacked through its own head's loss (the training loss itself, masked per head), on the model as
it is in this step: train mode, so BatchNorm normalises with the batch's statistics as the training pass will;
the running statistics and every other buffer are left as they were, so the extra pass does not count as a
training batch. It runs on the model without the loop's DDP or compile wrapper: it needs the input's gradient,
not the weights'. Cost: one more forward and backward pass per step, about twice the time of plain training.
The loss is then taken on the adversarial images only, as in Wong et al.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from transferkit.config import adversarial_eps
from transferkit.training.losses import masked_head_losses
from transferkit.training.precision import forward

STEP = 1.25  # adversarial training's gradient step, in units of eps (Wong et al.)

Loss = Callable[[torch.Tensor], torch.Tensor]  # images in 0..1 -> the scalar loss whose gradient the attack follows


def fgsm(loss_of: Loss, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x: float (N,3,S,S) in 0..1 -> x moved by eps along the sign of the loss gradient, clipped to [0, 1]."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(x), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def pgd(
    loss_of: Loss,
    x: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`steps` FGSM steps of `step_size` from a random start in the eps-ball, each projected back into the ball
    around x and into [0, 1]."""
    step = 2.5 * eps / steps if step_size is None else step_size
    start = torch.rand(x.shape, generator=generator, device=generator.device if generator else "cpu")
    adv = (x + eps * (start.to(x.device) * 2 - 1)).clamp(0, 1).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_of(adv), adv)
        adv = adv.detach() + step * grad.sign()
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


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
