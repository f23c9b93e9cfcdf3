"""Black-box shift tests on a model's softmax outputs (Rabanser et al., "Failing Loudly", NeurIPS 2019): does a
sample of outputs (traffic) come from the same distribution as a reference sample (held-out test images)?

- class probabilities: a two-sample Kolmogorov-Smirnov test per class, Bonferroni-corrected over the classes;
- predicted labels: a chi-square test of the top-1 class counts (label shift);
- confidence: a KS test of the top-1 softmax score (a model unsure of what it now sees).
A sample drifts when any of the three corrected p-values is below alpha. Torch-free (numpy and scipy), so the
same tests serve `transferkit drift` and the server's live drift score (serving/drift_monitor.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

ALPHA = 0.01
PREFIXES = (50, 100, 200, 500, 1000, 2000, 5000)
MAX_CLASSES_TESTED = 100  # past this many classes the per-class KS tests are skipped (cost; the label test stays)


@dataclasses.dataclass
class HeadTest:
    rows: int
    class_p: float  # the smallest per-class KS p-value times the number of classes (Bonferroni), at most 1
    label_p: float
    confidence_p: float
    drift: bool
    needed: int | None = None  # rows of the window the tests first fell below alpha at

    @property
    def p(self) -> float:
        return min(self.class_p, self.label_p, self.confidence_p)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample KS p-value from the asymptotic distribution: scipy's default computes the exact one for
    samples of up to 10,000, in time proportional to their product (about 16 ms for 4,000 x 1,000, and a drift
    check runs one per class), where the asymptotic value is already accurate for samples of a few hundred."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(a, b, method="asymp").pvalue)


def shift_tests(reference: np.ndarray, traffic: np.ndarray, alpha: float = ALPHA) -> HeadTest:
    """Softmax outputs (N, C) of the reference and of the traffic -> the three tests and the verdict."""
    from scipy.stats import chi2_contingency

    classes = reference.shape[1]
    class_p = 1.0
    if classes <= MAX_CLASSES_TESTED:
        class_p = min(1.0, classes * min(_ks(reference[:, c], traffic[:, c]) for c in range(classes)))
    counts = np.stack(
        [np.bincount(reference.argmax(1), minlength=classes), np.bincount(traffic.argmax(1), minlength=classes)]
    )
    seen = counts.sum(0) > 0  # a class neither side predicted carries no information (and breaks the test)
    label_p = float(chi2_contingency(counts[:, seen])[1]) if seen.sum() > 1 else 1.0
    confidence_p = _ks(reference.max(1), traffic.max(1))
    drift = bool(min(class_p, label_p, confidence_p) < alpha)
    return HeadTest(len(traffic), float(class_p), label_p, confidence_p, drift)


def samples_needed(reference: np.ndarray, traffic: np.ndarray, alpha: float) -> int | None:
    for n in PREFIXES:
        if n > len(traffic):
            break
        if shift_tests(reference, traffic[:n], alpha).drift:
            return n
    return len(traffic) if shift_tests(reference, traffic, alpha).drift else None


__all__ = ["ALPHA", "HeadTest", "samples_needed", "shift_tests", "softmax"]
