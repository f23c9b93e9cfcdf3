"""Training data: every labelled dataset concatenated into one pool, with labels translated into its head's
class indices; plus an optional pool of unlabeled images.

Two ways to feed a step, behind one `Pool.iterate(index_batches)`:
- in memory (everything built in, and image folders that fit): the pool lives on the training device as
  uint8 NCHW, so a step is an index gather: no DataLoader, no host-to-device copy per step;
- streamed (an image folder whose train split is over `max_in_memory_gb`): a DataLoader with worker
  processes decodes the step's files into pinned memory, prefetching ahead, and copies them asynchronously.
Either way the step sees the same uint8 batch, so the two paths train identically.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from transferkit.data import ImageDataset, Split
from transferkit.data.imagefolder import decode_file
from transferkit.errors import ConfigError
from transferkit.preprocess import Preprocessing
from transferkit.training.labels import HeadPlan, LabelMap, class_index_map, match_head

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images (N,3,S,S), labels, head ids


class _FilesDataset(torch.utils.data.Dataset):
    """Global pool index -> (uint8 CHW tensor, index); decodes files, or reads in-memory parts."""

    def __init__(self, parts: list[Split], pre: Preprocessing):
        self.parts, self.pre = parts, pre
        self.starts = np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()

    def __len__(self) -> int:
        return self.starts[-1] + len(self.parts[-1])

    def __getitem__(self, i: int):
        k = bisect.bisect_right(self.starts, i) - 1
        part, j = self.parts[k], i - self.starts[k]
        pixels = part.images[j] if part.images is not None else decode_file(part.paths[j], self.pre)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), i


def _collate(items):
    return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items])


@dataclass
class Pool:
    labels: torch.Tensor  # int64 (N,) on the device: class index in the sample's head; -1 where unknown
    head_ids: torch.Tensor  # int64 (N,) on the device: index into the head order
    sizes: list[int]  # images per source dataset, in order
    images: torch.Tensor | None = None  # uint8 (N,3,S,S) on the device, when in memory
    files: _FilesDataset | None = None  # when streamed
    workers: int = 2

    @property
    def streamed(self) -> bool:
        return self.images is None

    def iterate(self, index_batches: list[np.ndarray]) -> Iterator[Batch]:
        if not self.streamed:
            if not index_batches:
                return
            # one host-to-device copy of the epoch's indices, not one (synchronising) copy per step
            flat = torch.as_tensor(np.concatenate(index_batches), device=self.labels.device)
            for i in flat.split([len(b) for b in index_batches]):
                yield self.images[i], self.labels[i], self.head_ids[i]
            return
        device = self.labels.device
        loader = torch.utils.data.DataLoader(
            self.files,
            batch_sampler=[b.tolist() for b in index_batches],
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            collate_fn=_collate,
            persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            # its own generator: a DataLoader otherwise draws its worker seed from the global RNG, which
            # would shift dropout masks and break exact resume (decoding itself is not random)
            generator=torch.Generator().manual_seed(0),
        )
        for images, index in loader:
            i = index.to(device)
            yield images.to(device, non_blocking=True), self.labels[i], self.head_ids[i]


def _pool(
    parts: list[Split], labels: list[np.ndarray], head_ids: list[int], pre: Preprocessing, device, workers: int
) -> Pool:
    lab = torch.from_numpy(np.concatenate(labels)).to(device)
    heads = torch.cat([torch.full((len(p),), h) for p, h in zip(parts, head_ids)]).to(device)
    pool = Pool(lab, heads, [len(p) for p in parts], workers=workers)
    if any(p.streamed for p in parts):
        pool.files = _FilesDataset(parts, pre)
    else:
        arrays = [torch.from_numpy(np.ascontiguousarray(p.images.transpose(0, 3, 1, 2))) for p in parts]
        pool.images = torch.cat(arrays).to(device)
    return pool


def labelled_pool(
    datasets: list[ImageDataset], plan: HeadPlan, head_order: list[str], pre: Preprocessing, device, workers: int = 2
) -> Pool:
    labels = [np.asarray(plan.label_remap[ds.name], dtype=np.int64)[ds.train.labels] for ds in datasets]
    heads = [head_order.index(plan.labels.datasets[ds.name]) for ds in datasets]
    return _pool([ds.train for ds in datasets], labels, heads, pre, device, workers)


def unlabeled_pool(
    datasets: list[tuple[ImageDataset, str | None]],
    plan: HeadPlan,
    head_order: list[str],
    label_map: LabelMap,
    pre: Preprocessing,
    device,
    workers: int = 2,
) -> tuple[Pool, dict[str, str]]:
    """Images whose labels are never used for training. Each is assigned a head: the one named, or the
    one whose class names match its own. Their true labels, mapped into that head, are kept only to report
    pseudo-label accuracy (-1 where a class has no counterpart)."""
    labels, heads, assigned = [], [], {}
    for ds, head in datasets:
        if head is None:
            head = match_head(ds.classes, plan.labels.heads, label_map)
            if head is None:
                raise ConfigError(
                    f"unlabeled {ds.name}: no head shares its class names; name one with --unlabeled {ds.name}=HEAD "
                    f"(heads: {head_order})"
                )
        elif head not in plan.labels.heads:
            head = plan.labels.datasets.get(head, head)  # a dataset name stands for its head
            if head not in plan.labels.heads:
                raise ConfigError(f"unlabeled {ds.name}={head}: no such head; heads are {head_order}")
        mapping = class_index_map(ds.classes, plan.labels.heads[head], label_map)
        labels.append(np.asarray([mapping.get(int(c), -1) for c in ds.train.labels], dtype=np.int64))
        heads.append(head_order.index(head))
        assigned[ds.name] = head
    parts = [ds.train for ds, _ in datasets]
    return _pool(parts, labels, heads, pre, device, workers), assigned
