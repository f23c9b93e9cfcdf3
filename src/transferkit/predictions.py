"""A head's logits -> the answer users get: top-k labels with softmax scores, best first.

One definition for everything that answers with labels (the HTTP server, `transferkit score`), so a file gets
the same labels and scores from either. Work is done once per batch: per image, numpy on a row of ten values
costs more than the decode of a small image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A head's answer for one batch: per image, every class as (index, softmax score rounded to 6 places), best first.
RANKED = np.dtype([("index", np.int32), ("score", np.float64)])


def rank(logits: np.ndarray) -> np.ndarray:
    """(B, C) logits -> (B, C) RANKED (the server calls it in its runtime thread, off the event loop)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")  # ties: the lower class index first
    ranked = np.empty(order.shape, RANKED)
    ranked["index"] = order
    ranked["score"] = np.round(np.take_along_axis(p, order, axis=1), 6)
    return ranked


def top_labels(ranked_row: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    """One image's RANKED row -> [{"label", "score"}] for its k best classes."""
    return [{"label": labels[i], "score": score} for i, score in ranked_row[:k].tolist()]
