"""Training data as device tensors: every labelled dataset concatenated into one pool (uint8, NCHW), with
its labels translated into its head's class indices, plus an optional pool of unlabelled images.

Small datasets (everything built in, and image folders that fit) live on the training device as uint8,
so a step is an index gather and on-device augmentation: no DataLoader, no host-to-device copy per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from transferkit.data import ImageDataset
from transferkit.errors import ConfigError
from transferkit.training.labels import HeadPlan, LabelMap, class_index_map, match_head


@dataclass
class Pool:
    images: torch.Tensor  # uint8 (N, 3, S, S) on the training device
    labels: torch.Tensor  # int64 (N,): class index in the sample's head; -1 where unknown
    head_ids: torch.Tensor  # int64 (N,): index into the head order
    sizes: list[int]  # images per source dataset, in order
    names: list[str]  # source dataset names

    def take(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(index, device=self.images.device)
        return self.images[i], self.labels[i], self.head_ids[i]


def _to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


def labelled_pool(datasets: list[ImageDataset], plan: HeadPlan, head_order: list[str], device) -> Pool:
    images, labels, head_ids = [], [], []
    for ds in datasets:
        remap = np.asarray(plan.label_remap[ds.name], dtype=np.int64)
        images.append(_to_device(ds.train.images, device))
        labels.append(torch.from_numpy(remap[ds.train.labels]))
        head_ids.append(torch.full((len(ds.train),), head_order.index(plan.labels.datasets[ds.name])))
    return Pool(
        torch.cat(images),
        torch.cat(labels).to(device),
        torch.cat(head_ids).to(device),
        [len(ds.train) for ds in datasets],
        [ds.name for ds in datasets],
    )


def parse_unlabeled(spec: str) -> tuple[str, str | None]:
    """`digits` or `digits=mnist` -> (dataset, head or None)."""
    name, _, head = spec.partition("=")
    return name, (head or None)


def unlabelled_pool(
    datasets: list[tuple[ImageDataset, str | None]],
    plan: HeadPlan,
    head_order: list[str],
    label_map: LabelMap,
    device,
) -> tuple[Pool, dict[str, str]]:
    """Images whose labels are never used for training. Each is assigned a head: the one named, or the
    one whose class names match its own. Their true labels, mapped into that head, are kept only to report
    pseudo-label accuracy (-1 where a class has no counterpart)."""
    images, labels, head_ids, assigned = [], [], [], {}
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
        true = np.asarray([mapping.get(int(c), -1) for c in ds.train.labels], dtype=np.int64)
        images.append(_to_device(ds.train.images, device))
        labels.append(torch.from_numpy(true))
        head_ids.append(torch.full((len(ds.train),), head_order.index(head)))
        assigned[ds.name] = head
    pool = Pool(
        torch.cat(images),
        torch.cat(labels).to(device),
        torch.cat(head_ids).to(device),
        [len(ds.train) for ds, _ in datasets],
        [ds.name for ds, _ in datasets],
    )
    return pool, assigned
