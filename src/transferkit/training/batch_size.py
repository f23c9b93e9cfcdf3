"""`--batch-size auto`: the largest batch that both the data and the memory allow.

Memory (memory.py) bounds the batch from above on a CPU. The data bounds it too, and matters more for the
case transfer learning is for, a few hundred images: 400 images at the batch memory allows (128) make 4
optimiser steps an epoch, 8 in a two-epoch run (62.8% validation accuracy on two classes of photos where batch
32 reaches 99.0%). So the batch is also at most the largest that gives every epoch MIN_STEPS_PER_EPOCH steps and
the run MIN_TOTAL_STEPS, but the data alone never takes it below MIN_DATA_BATCH: at the default learning rate
smaller batches trained worse in benchmarks/small_data.py's sweep (Fashion-MNIST, 32 px, 500 images: 67.3% at
batch 8, 71.1% at 16, 73.3% at 32), and with precise BatchNorm (precise_bn.py) a few large steps no longer
leave the running statistics behind. Only memory takes the batch lower. docs/small_data.md compares the
default with the best batch of the sweep from 50 to 2,000 images per class.

The choice is a pure function of (images, epochs, what memory allows): every process of a distributed run
makes the same one, and config.yaml records it, so a resumed run keeps it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import psutil
import torch

from transferkit.training.memory import CANDIDATES, DEFAULT_BATCH, measure

MIN_STEPS_PER_EPOCH = 20
MIN_TOTAL_STEPS = 40
MIN_DATA_BATCH = 32


def steps(images: int, batch: int, epochs: int = 1) -> int:
    return math.ceil(images / batch) * epochs


def data_cap(images: int, epochs: int) -> int:
    """The largest candidate batch that still gives `images` training images MIN_STEPS_PER_EPOCH steps an epoch
    and MIN_TOTAL_STEPS over `epochs`, or MIN_DATA_BATCH when none above it does."""
    for batch in CANDIDATES:  # largest first
        if batch <= MIN_DATA_BATCH:
            return batch
        if steps(images, batch) >= MIN_STEPS_PER_EPOCH and steps(images, batch, epochs) >= MIN_TOTAL_STEPS:
            return batch
    return CANDIDATES[-1]


def choose(images: int, epochs: int, memory_batch: int) -> tuple[int, str]:
    """(the batch, a sentence: its steps, and what the data and the memory each allow) for `images` per epoch."""
    cap = data_cap(images, epochs)
    batch = min(cap, memory_batch)
    per_epoch, total = steps(images, batch), steps(images, batch, epochs)
    floor = (
        f"aiming at {MIN_STEPS_PER_EPOCH} steps an epoch and {MIN_TOTAL_STEPS} in all, no lower than {MIN_DATA_BATCH}"
    )
    if per_epoch < MIN_STEPS_PER_EPOCH or total < MIN_TOTAL_STEPS:
        floor += f"; not reached at batch {batch}: more --epochs would help"
    return batch, (
        f"batch {batch}: {images} training images, {per_epoch} steps an epoch, {total} in all ({floor}; "
        f"the data allows {cap}, memory {memory_batch})"
    )


def auto_batch_size(
    model: torch.nn.Module,
    image_size: int,
    device: torch.device,
    max_memory_gb: float,
    distributed: bool,
    images: int,
    epochs: int,
    views: int = 1,
) -> tuple[int, str]:
    """(the batch size, a sentence saying how it was chosen). `images`: labelled training images an epoch draws;
    `views`: passes of each image per step."""
    if device.type != "cpu" or distributed:
        where = "a GPU" if device.type != "cpu" else "torchrun"
        batch, why = choose(images, epochs, DEFAULT_BATCH)
        return batch, f"batch size auto: {why} (on {where} memory is not measured: {DEFAULT_BATCH} is assumed)"
    budget = max_memory_gb * 2**30 if max_memory_gb > 0 else psutil.virtual_memory().available / 2
    estimate = replace(measure(model, image_size, budget), views=views)  # a step's passes: not measured, known
    batch, why = choose(images, epochs, estimate.choose())
    return batch, f"batch size auto: {why}; {estimate.describe(estimate.choose())}"
