"""The live drift score on /metrics: the capture sample's softmax outputs against the artifact's stored reference.

Each worker keeps, per model, version and head, the last WINDOW captured outputs in a ring buffer; every EVERY
new rows (once the window holds at least MIN_ROWS) it runs transferkit/shift.py's tests (KS per class with
Bonferroni, chi-square of the predicted labels, KS of the top-1 confidence) against the reference the artifact
was exported with (its own outputs on the gate's held-out images: drift_reference.py). The result is two
gauges, `transferkit_drift_p` (the smallest corrected p-value: low means the traffic no longer looks like the
test data) and `transferkit_drift` (1 when it is below alpha), the smallest p and the largest flag over the
workers. `transferkit drift` on the capture folder gives the same tests with windows over time and a report.

It runs on the capture's writer thread, after a part is written: never on a request's path. The tests cost a few
milliseconds for a 10-class head (the per-class tests are skipped past shift.MAX_CLASSES_TESTED classes). An
export made before references were stored has none, and its versions get no score.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from transferkit.shift import ALPHA, HeadTest, shift_tests, softmax

WINDOW = 1000  # the newest captured outputs tested, per worker, model version and head
EVERY = 250  # new rows between two tests
MIN_ROWS = 250  # no score before the window holds this many


class _Ring:
    """The newest `size` rows of (n, classes) arrays, oldest first on read."""

    def __init__(self, size: int, classes: int):
        self.rows = np.empty((size, classes), np.float32)
        self.filled, self.next, self.new = 0, 0, 0

    def add(self, values: np.ndarray) -> None:
        size, count = len(self.rows), len(values)
        values = values[-size:]  # more than the ring holds: only the newest fit
        n, end = len(values), self.next + len(values)
        if end <= size:
            self.rows[self.next : end] = values
        else:  # wraps around
            split = size - self.next
            self.rows[self.next :] = values[:split]
            self.rows[: n - split] = values[split:]
        self.next = end % size
        self.filled = min(size, self.filled + n)
        self.new += count

    def window(self) -> np.ndarray:
        if self.filled < len(self.rows):
            return self.rows[: self.filled]
        return np.concatenate([self.rows[self.next :], self.rows[: self.next]])


class DriftMonitor:
    def __init__(
        self,
        on_result: Callable[[str, str, str, HeadTest], None],
        window: int = WINDOW,
        every: int = EVERY,
        min_rows: int = MIN_ROWS,
        alpha: float = ALPHA,
    ):
        self.on_result = on_result
        self.window, self.every, self.min_rows, self.alpha = window, every, min_rows, alpha
        self._rings: dict[tuple[str, str, str], _Ring] = {}
        self._lock = threading.Lock()  # one writer thread today; a second caller must not tear a ring

    def observe(self, model: str, version: str, reference: dict[str, np.ndarray], logits: dict[str, np.ndarray]):
        """Captured logits (per head, (n, classes)) of one model version, and that version's reference."""
        with self._lock:
            for head, values in logits.items():
                ref = reference.get(head)
                if ref is None or ref.shape[1] != values.shape[1]:
                    continue  # a head the reference does not know: nothing to compare with
                ring = self._rings.get((model, version, head))
                if ring is None:
                    ring = self._rings[model, version, head] = _Ring(self.window, values.shape[1])
                ring.add(softmax(values.astype(np.float64)).astype(np.float32))
                if ring.new >= self.every and ring.filled >= self.min_rows:
                    ring.new = 0
                    self.on_result(model, version, head, shift_tests(ref, ring.window(), self.alpha))

    def forget(self, model: str, version: str) -> None:
        """Drop an unloaded version's windows."""
        with self._lock:
            for key in [k for k in self._rings if k[:2] == (model, version)]:
                del self._rings[key]


__all__ = ["DriftMonitor"]
