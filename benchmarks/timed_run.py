"""The timed training run the benchmarks share (benchmarks/transfer.py, distill.py): a fresh folder, the
config with the run's overrides, the training time printed. Its own module so that those scripts import it
rather than each other."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from transferkit.config import TrainConfig
from transferkit.training import train


def run(name: str, base: TrainConfig, root: Path, **overrides) -> Path:
    """Train `base` with `overrides` into root/name (emptied first) -> the run folder."""
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    cfg = replace(base, out=str(out), **overrides)
    t = time.perf_counter()
    train(cfg)
    print(f"[{name}] trained in {time.perf_counter() - t:.0f}s", flush=True)
    return out
