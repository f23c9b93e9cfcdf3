"""Per-step losses. Every head computes a loss on every sample and masks out samples of other heads, so
a batch may lack a dataset entirely (its head then contributes zero) and every parameter stays in the
graph (DistributedDataParallel needs no `find_unused_parameters`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_head_losses(
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    head_ids: torch.Tensor,
    head_order: list[str],
    head_weights: list[float],
    class_weights: list[torch.Tensor | None],
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weighted sum over heads of each head's mean loss on its own samples, per-sample correctness)."""
    total = logits[head_order[0]].new_zeros((), dtype=torch.float32)
    correct = torch.zeros_like(labels, dtype=torch.bool)
    for h, name in enumerate(head_order):
        mask = head_ids == h
        y = torch.where(mask, labels, torch.zeros_like(labels))
        lg = logits[name].float()
        ce = F.cross_entropy(lg, y, weight=class_weights[h], reduction="none", label_smoothing=label_smoothing)
        w = class_weights[h][y] if class_weights[h] is not None else torch.ones_like(ce)
        denom = (w * mask).sum().clamp(min=1e-6)
        total = total + head_weights[h] * (ce * mask).sum() / denom
        correct |= mask & (lg.argmax(1) == y)
    return total, correct


class DistributionAlignment:
    """ReMixMatch's distribution alignment: scale the weak-view class probabilities by
    p(labelled classes) / running mean of p(predicted classes on unlabeled data), per head.

    Under domain shift a source head tends to pour target images into a few classes with high confidence;
    alignment pushes the pseudo-label distribution back towards the labelled class prior before the
    confidence threshold is applied, so those confident-but-wrong labels are fewer."""

    def __init__(self, priors: list[torch.Tensor], momentum: float = 0.999):
        self.target = [p / p.sum() for p in priors]  # labelled class frequencies per head
        self.running = [torch.full_like(p, 1.0 / len(p)) for p in self.target]
        self.momentum = momentum

    @torch.no_grad()
    def __call__(self, head: int, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Aligned probabilities for the rows of `mask` (this head's samples); other rows unchanged.
        Written without boolean indexing, so it never waits for the GPU."""
        m = mask.float()[:, None]
        count = m.sum()
        batch_mean = (probs * m).sum(0) / count.clamp(min=1.0)
        rate = (1.0 - self.momentum) * (count > 0).float()  # no update from a batch without this head
        self.running[head].lerp_(batch_mean, rate)
        aligned = probs * (self.target[head] / self.running[head].clamp(min=1e-6))
        aligned = aligned / aligned.sum(1, keepdim=True)
        return torch.where(m.bool(), aligned, probs)

    def state_dict(self) -> dict:
        return {"running": [r.cpu() for r in self.running]}

    def load_state_dict(self, state: dict) -> None:
        for r, saved in zip(self.running, state["running"]):
            r.copy_(saved)


def pseudo_label_loss(
    weak_logits: dict[str, torch.Tensor],
    strong_logits: dict[str, torch.Tensor],
    head_ids: torch.Tensor,
    head_order: list[str],
    threshold: float,
    alignment: DistributionAlignment | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch: label from the weak view, loss on the strong view, only where confidence >= threshold
    (after distribution alignment when given).

    -> (loss averaged over all unlabeled samples, keep mask, pseudo-labels)."""
    n = head_ids.shape[0]
    loss = weak_logits[head_order[0]].new_zeros((), dtype=torch.float32)
    keep = torch.zeros(n, dtype=torch.bool, device=head_ids.device)
    pseudo = torch.zeros(n, dtype=torch.long, device=head_ids.device)
    for h, name in enumerate(head_order):
        mask = head_ids == h
        if name not in weak_logits:
            continue
        probs = weak_logits[name].detach().float().softmax(1)
        if alignment is not None:
            probs = alignment(h, probs, mask)
        conf, guess = probs.max(1)
        sel = mask & (conf >= threshold)
        ce = F.cross_entropy(strong_logits[name].float(), guess, reduction="none")
        loss = loss + (ce * sel).sum() / max(n, 1)
        keep |= sel
        pseudo = torch.where(mask, guess, pseudo)
    return loss, keep, pseudo


def auto_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 over present classes (absent classes get 0)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros_like(counts))
    return w
