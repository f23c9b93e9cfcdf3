"""`--batch-size auto`, its memory half: on a CPU, the largest batch whose training step fits a budget, measured.

Fine-tuning at 224 px with a batch of 128 held about 10 GB of RAM for MobileNetV2, enough for the kernel to kill
a larger backbone on a laptop without a word. So on a CPU the default is measured, not assumed: one forward and
backward pass of the real model at 8 and at 16 images, with the process's resident memory sampled every
millisecond (memory freed earlier handed back to the system first), gives the step's fixed cost and its cost per image; the batch is the largest of 8, 16, ..., 128
(128 being the default the recipes were tuned at) whose step fits `--max-memory-gb` (default: half the RAM
available once the data is loaded). The measurement runs in eval mode under a forked RNG on random pixels, so
the model's weights, BatchNorm statistics and every random stream are as they were. On a GPU, or under torchrun
(every process would measure its own), memory allows 128. The data half, and the choice: batch_size.py.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil
import torch

CANDIDATES = (128, 64, 32, 16, 8)
DEFAULT_BATCH = 128
_PROBES = (8, 16)


@dataclass(frozen=True)
class MemoryEstimate:
    fixed_bytes: float  # a training step's memory beyond what the process held before it, at zero images
    per_image_bytes: float
    budget_bytes: float
    views: int = 1  # passes of each labelled image through the model per step (1 + --robust-views)

    def step_bytes(self, batch: int) -> float:
        return self.fixed_bytes + batch * self.views * self.per_image_bytes

    def choose(self) -> int:
        return next((b for b in CANDIDATES if self.step_bytes(b) <= self.budget_bytes), CANDIDATES[-1])

    def describe(self, batch: int) -> str:
        gb = 1 / 2**30
        fits = "" if self.step_bytes(batch) <= self.budget_bytes else " (does not fit: the smallest offered)"
        return (
            f"a training step measured {self.fixed_bytes * gb:.2f} GB + {self.per_image_bytes / 2**20:.1f} MB "
            f"per image{f' x {self.views} views' if self.views > 1 else ''}; budget {self.budget_bytes * gb:.1f} GB "
            f"-> batch {batch}{fits}"
        )


class _PeakRss:
    """The process's peak resident memory while the block runs (sampled every millisecond in a thread)."""

    def __enter__(self) -> _PeakRss:
        self._process, self._stop, self.peak = psutil.Process(), threading.Event(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _release_freed_memory() -> None:
    """Hand memory the process freed back to the system (glibc's malloc_trim), so that resident memory counts
    what is in use: otherwise buffers freed by earlier work (decoding the data, a previous probe) are reused
    by the probe without growing the process, and the step looks cheaper than it is."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: the estimate may read low after large temporary allocations
        pass


def measure(model: torch.nn.Module, image_size: int, budget_bytes: float) -> MemoryEstimate:
    """One forward/backward of `model` (on the CPU) at each probe batch size -> its memory model."""
    was_training = model.training
    peaks = []
    with torch.random.fork_rng(devices=[]):
        model.eval()  # no BatchNorm statistics updated, no dropout drawn
        for batch in _PROBES:
            x = torch.rand(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
            _release_freed_memory()
            start = psutil.Process().memory_info().rss
            with _PeakRss() as rss:
                out = model(x)
                sum(v.float().mean() for v in out.values()).backward()
            model.zero_grad(set_to_none=True)
            del x, out
            peaks.append(rss.peak - start)
    model.train(was_training)
    per_image = max(0.0, (peaks[1] - peaks[0]) / (_PROBES[1] - _PROBES[0]))
    return MemoryEstimate(max(0.0, peaks[0] - per_image * _PROBES[0]), per_image, budget_bytes)
