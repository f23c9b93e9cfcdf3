"""Precise BatchNorm: the running statistics recomputed over the training images before the model is judged.

In training mode BatchNorm normalises by the batch's own statistics and only nudges its running statistics
(momentum 0.1 a step) towards them; evaluation, export and serving use the running ones. After a few hundred
steps the two agree, but a small dataset trains in a few dozen: after 8 steps at momentum 0.1 the running
statistics are still 0.9^8 = 43% ImageNet's, so a network that fits its training batches (97%) evaluated near
chance (63% on two classes of photos; 23% on 200 digits at 32 px, docs/small_data.md). So before every validation,
and so before model.pt, export and serving, each BatchNorm's running mean and variance become their average over
a fixed sample of the training images, un-augmented and normalised as at evaluation (the idea of detectron2's
`PreciseBN`, with the cumulative average of training/adaptation.py's AdaBN). The weights are untouched.

The sample follows the training mix: the labelled images in the order the run's sampler drew them this epoch
(so `--sampling balanced` weighs datasets as training did) and, with `--unlabeled`, the unlabeled images at
`--unlabeled-ratio` per labelled image in the same batches, as a training step mixes them. Every process of a
distributed run computes the same statistics from the same images, so no reduction is needed.

A frozen backbone (`--freeze-epochs`) keeps its statistics: the heads were trained on features normalised by
them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from transferkit.training.adaptation import adapt_batchnorm, batchnorms

CHUNK = 64  # images per forward pass: the per-batch variance misses 1/CHUNK of the population's


def sample_indices(setup, epoch: int, images: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(labelled pool indices, unlabeled pool indices or None): the first `images` labelled images of the
    epoch's own draw, and `unlabeled_ratio` unlabeled images for each."""
    labelled = np.concatenate(setup.sampler.epoch_batches(epoch))[:images]
    if setup.unlabeled is None:
        return labelled, None
    n_unl = len(setup.unlabeled.labels)
    want = min(n_unl, len(labelled) * setup.config.unlabeled_ratio)
    rng = np.random.default_rng([setup.config.seed, epoch, 11])
    return labelled, rng.permutation(n_unl)[:want]


def _chunks(setup, labelled: np.ndarray, unlabeled: np.ndarray | None) -> Iterator[torch.Tensor]:
    """uint8 batches of about CHUNK images; each holds labelled and unlabeled images in the sample's ratio."""
    n_chunks = max(1, -(-len(labelled) // CHUNK))
    lab_parts = np.array_split(labelled, n_chunks)
    lab_batches = setup.pool.iterate(lab_parts)
    if unlabeled is None:
        yield from (images for images, _, _ in lab_batches)
        return
    unl_batches = setup.unlabeled.iterate(np.array_split(unlabeled, n_chunks))
    for (images, _, _), (u_images, _, _) in zip(lab_batches, unl_batches):
        yield torch.cat([images, u_images])


def recompute(model: nn.Module, setup, epoch: int, images: int) -> int:
    """Every BatchNorm's running statistics become the average over the training sample of `epoch` (at most
    `images` labelled images) -> images seen; 0 where the model has no BatchNorm or `images` is 0."""
    if images <= 0 or not batchnorms(model):
        return 0
    labelled, unlabeled = sample_indices(setup, epoch, images)
    return adapt_batchnorm(model, _chunks(setup, labelled, unlabeled), setup.preprocessing)
