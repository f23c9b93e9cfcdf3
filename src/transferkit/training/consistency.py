"""`--robust-views K` and `--consistency-weight W`: every labelled image trained as its shifted view and K robust
views of it, with AugMix's Jensen-Shannon consistency among them optional.

    x = shifted_and_robust_views(images_uint8, gen, severity, k)   # ((K+1)N,3,S,S): shifted images, then K views
    loss = cross_entropy(every view) + W * js_consistency(logits, head_ids, head_order, head_weights, k + 1)

Why: with `--robust-views 0` the robust view replaces the image, so the labels are learnt only from mixed and
noised images, which cost Fashion-MNIST about a point of clean accuracy at the demo recipe's four epochs. Keeping
the shifted view in the batch beside its robust views (Hoffer et al., "Augment your batch", 2019) gives the clean
signal back at the price of K more passes per image; docs/guide-training.md has the measurements that chose it.

AugMix (Hendrycks, Mu et al., ICLR 2020) takes the cross-entropy on the clean view only and adds the
Jensen-Shannon divergence of the clean and two augmented predictions at weight 12. Here the cross-entropy is on
every view: AugMix's own split trained too slowly at four epochs, and even with cross-entropy on every view the JS
term at 12 cost Fashion-MNIST about three points of clean accuracy there (docs/guide-training.md), so it is an
option, off by default. JS(p_1..p_V) = mean_i KL(p_i || M), M = mean_i p_i, with M clamped away from zero before
its log as AugMix's reference code does, each image on its own head, averaged over the images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transferkit.training import augment
from transferkit.training.robust_augment import robust_view


def shifted_and_robust_views(images_uint8: torch.Tensor, gen: torch.Generator, severity: int, k: int) -> torch.Tensor:
    """uint8 (N,3,S,S) -> float ((K+1)N,3,S,S) in 0..1: the default view, then K robust views of that same view.
    Draws from `gen` in a fixed order (the shift, then each robust view), so a resumed run replays them."""
    shifted = augment.weak_view(augment.to_unit(images_uint8), gen)
    return torch.cat([shifted, *(robust_view(shifted, gen, severity) for _ in range(k))])


def js_consistency(
    logits: dict[str, torch.Tensor],
    head_ids: torch.Tensor,
    head_order: list[str],
    head_weights: list[float],
    views: int,
) -> torch.Tensor:
    """Mean over the N images of the Jensen-Shannon divergence of their `views` predictions, each image on its own
    head (weighted by the head's weight, as the cross-entropy is). `logits`: head -> (views x N, classes), view by
    view as shifted_and_robust_views orders them."""
    n = len(head_ids)
    total = logits[head_order[0]].new_zeros((), dtype=torch.float32)
    for h, name in enumerate(head_order):
        mask = (head_ids == h).float()
        probs = F.softmax(logits[name].float(), dim=1).view(views, n, -1)
        log_mixture = probs.mean(0).clamp(1e-7, 1.0).log()
        # KL(p_i || M) summed over classes, per view and image: F.kl_div(log M, p_i) is p_i (log p_i - log M)
        kl = F.kl_div(log_mixture.expand_as(probs), probs, reduction="none").sum(2)
        total = total + head_weights[h] * (kl.mean(0) * mask).sum() / mask.sum().clamp(min=1.0)
    return total
