"""How much accuracy a candidate lost against a reference on the same images, with a confidence bound: the export
gate's statistic (an artifact against PyTorch) and `transferkit compare`'s (a new run against the serving one).

Both models answer the *same* images, so the comparison is paired: what matters is the images on which they
disagree about being right. Per image there are four cells,

                        artifact right   artifact wrong
    PyTorch right            a                c          (c: images the artifact lost)
    PyTorch wrong            b                d          (b: images the artifact gained)

and the accuracy drop is (c - b) / n. Its one-sided upper confidence bound is the Agresti-Min adjusted Wald
bound for the difference of paired proportions (Agresti and Min, Statistics in Medicine 2005: add 0.5 to each
cell, then the Wald interval; its coverage is close to nominal even with a handful of discordant images, where
the plain Wald interval is far too narrow). A lossy artifact passes when that upper bound is within the
tolerance: the drop is shown to be small at the stated confidence (non-inferiority). Being more accurate is
never a failure, and an artifact that agrees with PyTorch on every image passes as soon as the sample is large
enough for zero disagreements to prove the bound (`best_provable_drop`).

What this costs in refusals of a good artifact is measured in docs/guide-export.md (benchmarks/gate_noise.py):
an artifact whose true drop is zero but which disagrees on a fraction q of the images passes when
z * sqrt(q / n) is within the tolerance, so the gate needs more images the more the artifact disagrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class PairedDrop:
    """The accuracy drop of a candidate against the reference on the same images, in points."""

    images: int
    lost: int  # right by the reference, wrong by the candidate
    gained: int  # wrong by the reference, right by the candidate
    drop_points: float  # measured: accuracy_reference - accuracy_candidate, x100
    upper_points: float | None  # one-sided upper confidence bound on the drop; None without a confidence
    confidence: float | None

    def within(self, max_drop_points: float) -> bool:
        """The decision: the bound (or, without a confidence, the measured drop) is within the tolerance."""
        value = self.drop_points if self.upper_points is None else self.upper_points
        return value <= max_drop_points + 1e-9

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "images": self.images,
            "lost": self.lost,
            "gained": self.gained,
            "drop_points": round(self.drop_points, 4),
            "drop_upper_points": None if self.upper_points is None else round(self.upper_points, 4),
            "confidence": self.confidence,
        }


def _z(confidence: float) -> float:
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be within [0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(confidence)


def upper_bound(lost: int, gained: int, images: int, confidence: float) -> float:
    """The Agresti-Min one-sided upper bound on the drop, in points."""
    n = images + 2.0
    c, b = lost + 0.5, gained + 0.5
    estimate = (c - b) / n
    variance = max((b + c) - (c - b) ** 2 / n, 0.0) / n**2
    return 100.0 * (estimate + _z(confidence) * math.sqrt(variance))


def paired_drop(reference_right: np.ndarray, candidate_right: np.ndarray, confidence: float | None) -> PairedDrop:
    """Per-image correctness of both models on the same images -> the drop with its bound (`confidence` None:
    the measured drop only, for precisions judged on their logits)."""
    ref = np.asarray(reference_right, dtype=bool)
    got = np.asarray(candidate_right, dtype=bool)
    if ref.shape != got.shape or ref.ndim != 1:
        raise ValueError(f"paired_drop needs two equal 1-D arrays, got {ref.shape} and {got.shape}")
    n = int(ref.size)
    lost, gained = int((ref & ~got).sum()), int((~ref & got).sum())
    drop = 100.0 * (lost - gained) / max(n, 1)
    upper = None if confidence is None else upper_bound(lost, gained, n, confidence)
    return PairedDrop(n, lost, gained, drop, upper, confidence)


def best_provable_drop(images: int, confidence: float) -> float:
    """The smallest bound `images` can give: the bound when both models are right and wrong on the same images."""
    return upper_bound(0, 0, images, confidence)


CLEAR_PASS_PROBABILITY = 0.8


def clear_confidence(gate_confidence: float, pass_probability: float = CLEAR_PASS_PROBABILITY) -> float:
    """The confidence at which a pass on the validation split is *clear*: likely (`pass_probability`) to pass the
    gate on a test split of the same size, not about one time in two as a pass at the gate's own confidence is.

    With the drop measured as d on validation (standard error s) and the test split as large, the test's drop
    is about normal around d with variance 2 s^2 (the true drop's uncertainty plus the test's own noise); the
    gate passes when the test's drop + z_gate s <= tolerance, so d + (z_gate + z_p sqrt(2)) s <= tolerance
    passes it with probability p. At 95% and p = 0.8 that is the bound at 99.8% confidence."""
    z = NormalDist().inv_cdf(gate_confidence) + NormalDist().inv_cdf(pass_probability) * math.sqrt(2.0)
    return NormalDist().cdf(z)


def images_needed(max_drop_points: float, confidence: float, disagreement: float = 0.0) -> int:
    """How many images the bound needs to pass an artifact with no true drop that disagrees with the reference on
    the fraction `disagreement` of them, half lost and half gained (used in messages: how many to verify on)."""
    n = 16
    while upper_bound(round(n * disagreement / 2), round(n * disagreement / 2), n, confidence) > max_drop_points:
        n *= 2
        if n > 10**8:
            break
    lo, hi = n // 2, n
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        k = round(mid * disagreement / 2)
        lo, hi = (lo, mid) if upper_bound(k, k, mid, confidence) <= max_drop_points else (mid, hi)
    return hi
