"""`--consistency jsd`: AugMix's Jensen-Shannon consistency loss (Hendrycks, Mu et al., ICLR 2020, section 3).

    x = consistency_views(images_uint8, gen, severity)   # (3N,3,S,S): shifted images, then two robust views
    loss = cross_entropy(logits[:N]) + weight * js_consistency(logits, head_ids, head_order, head_weights)

Every labelled image goes through the model three times: as the default view (random shift), and as two
independent `--augment robust` views of that same shifted image. The cross-entropy is taken on the first only, so
the labels are learnt from images like the ones served; the Jensen-Shannon divergence of the three predictions,
each image on its own head, pulls the augmented predictions towards the clean one and each other. The mix alone
trains the labels on augmented images and costs clean accuracy where the operations are strong for the data
(Fashion-MNIST's textures); the consistency term asks only that the prediction not move.

JS(p1, p2, p3) = mean_i KL(p_i || M), M = mean_i p_i, as AugMix's reference code computes it (with M clamped
away from zero before its log), averaged over the images and weighted by --consistency-weight (AugMix's 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transferkit.training import augment
from transferkit.training.robust_augment import robust_view

VIEWS = 3  # the shifted image and two robust views of it, in this order in the batch


def consistency_views(images_uint8: torch.Tensor, gen: torch.Generator, severity: int) -> torch.Tensor:
    """uint8 (N,3,S,S) -> float (3N,3,S,S) in 0..1: the default view, then two robust views of that same view.
    Draws from `gen` in a fixed order (the shift, then each robust view), so a resumed run replays them."""
    shifted = augment.weak_view(augment.to_unit(images_uint8), gen)
    return torch.cat([shifted, robust_view(shifted, gen, severity), robust_view(shifted, gen, severity)])


def js_consistency(
    logits: dict[str, torch.Tensor], head_ids: torch.Tensor, head_order: list[str], head_weights: list[float]
) -> torch.Tensor:
    """Mean over the N images of the Jensen-Shannon divergence of their three views' predictions, each image on
    its own head (weighted by the head's weight, as the cross-entropy is). `logits`: head -> (3N, classes) in
    consistency_views' order."""
    n = len(head_ids)
    total = logits[head_order[0]].new_zeros((), dtype=torch.float32)
    for h, name in enumerate(head_order):
        mask = (head_ids == h).float()
        probs = F.softmax(logits[name].float(), dim=1).view(VIEWS, n, -1)
        log_mixture = probs.mean(0).clamp(1e-7, 1.0).log()
        # KL(p_i || M) summed over classes, per view and image: F.kl_div(log M, p_i) is p_i (log p_i - log M)
        kl = F.kl_div(log_mixture.expand_as(probs), probs, reduction="none").sum(2)
        per_image = kl.mean(0)
        total = total + head_weights[h] * (per_image * mask).sum() / mask.sum().clamp(min=1.0)
    return total
