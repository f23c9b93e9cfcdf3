"""Everything a training run needs before its first step: data, heads, model, optimiser, schedule.

Kept apart from the loop (trainer.py) so that `eval`, tests and benchmarks can build the same pieces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from transferkit.config import TrainConfig, parse_sampling
from transferkit.data import ImageDataset, load_dataset
from transferkit.errors import ConfigError
from transferkit.preprocess import Preprocessing
from transferkit.training.labels import HeadPlan, LabelMap, plan_heads
from transferkit.training.losses import DistributionAlignment, auto_class_weights
from transferkit.training.model import MultiHeadModel, build_model
from transferkit.training.optim import param_groups, warmup_cosine
from transferkit.training.pools import Pool, labelled_pool, parse_unlabeled, unlabelled_pool
from transferkit.training.sampling import CyclingSampler, MultiDatasetSampler


@dataclass
class TrainingSetup:
    config: TrainConfig
    device: torch.device
    preprocessing: Preprocessing
    datasets: list[ImageDataset]
    plan: HeadPlan
    label_map: LabelMap
    head_order: list[str]
    model: MultiHeadModel
    pool: Pool
    sampler: MultiDatasetSampler
    unlabelled: Pool | None = None
    unlabelled_sampler: CyclingSampler | None = None
    unlabelled_heads: dict[str, str] = field(default_factory=dict)  # unlabelled dataset -> head labelling it
    alignment: DistributionAlignment | None = None
    head_weights: list[float] = field(default_factory=list)
    class_weights: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


def load_datasets(config: TrainConfig, pre: Preprocessing) -> tuple[list[ImageDataset], list[tuple[ImageDataset, str | None]]]:
    budget = int(config.max_in_memory_gb * 2**30)
    labelled = [load_dataset(name, pre, config.limit, budget) for name in config.data]
    unlabelled = []
    for spec in config.unlabeled:
        name, head = parse_unlabeled(spec)
        unlabelled.append((load_dataset(name, pre, config.limit, budget), head))
    names = [d.name for d in labelled]
    if len(set(names)) != len(names):
        raise ConfigError(f"two datasets have the same name {names}; rename one image folder")
    return labelled, unlabelled


def build_setup(config: TrainConfig, device: torch.device) -> TrainingSetup:
    """Load data, plan heads, build the model on `device`. The config must already be validated."""
    label_map = LabelMap.from_file(config.label_map)
    loading = Preprocessing(image_size=config.image_size)  # mean/std are not needed to load pixels
    datasets, unlabelled_specs = load_datasets(config, loading)
    plan = plan_heads([(d.name, d.classes) for d in datasets], config.heads, label_map)
    model, mean, std = build_model(config.backbone, config.weights, plan.labels.heads)
    check_input_size(model, config.backbone, config.image_size)
    pre = Preprocessing(image_size=config.image_size, mean=mean, std=std)
    head_order = model.head_names
    if config.head_weights is not None and len(config.head_weights) != len(head_order):
        raise ConfigError(
            f"head_weights has {len(config.head_weights)} values but there are {len(head_order)} heads {head_order}"
        )
    # channels_last: ~2x faster convolutions on CPU (oneDNN) and the layout tensor cores want on GPU
    model.to(device, memory_format=torch.channels_last)
    pool = labelled_pool(datasets, plan, head_order, pre, device, config.workers)
    sampler = MultiDatasetSampler(pool.sizes, config.batch_size, parse_sampling(config.sampling), config.seed)
    setup = TrainingSetup(config, device, pre, datasets, plan, label_map, head_order, model, pool, sampler)
    if unlabelled_specs:
        setup.unlabelled, setup.unlabelled_heads = unlabelled_pool(
            unlabelled_specs, plan, head_order, label_map, pre, device, config.workers
        )
        setup.unlabelled_sampler = CyclingSampler(
            len(setup.unlabelled.labels), config.batch_size * config.unlabeled_ratio, config.seed
        )
        if config.distribution_alignment:
            priors = [
                torch.bincount(pool.labels[pool.head_ids == h], minlength=len(plan.labels.heads[name])).float() + 1.0
                for h, name in enumerate(head_order)
            ]
            setup.alignment = DistributionAlignment(priors)
    setup.head_weights = list(config.head_weights or [1.0] * len(head_order))
    setup.class_weights = [
        auto_class_weights(pool.labels[pool.head_ids == h], len(plan.labels.heads[name])).to(device)
        if config.class_weights == "auto"
        else None
        for h, name in enumerate(head_order)
    ]
    return setup


@torch.no_grad()
def check_input_size(model: MultiHeadModel, backbone: str, image_size: int) -> None:
    """A dry forward pass, so a backbone that cannot take this input size (ViT and Swin want 224 px, say)
    is refused with the reason before any training step, not deep inside the first one."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, image_size, image_size))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"backbone {backbone} cannot take {image_size}px inputs ({str(exc).splitlines()[0]}); "
            f"pick another --image-size (e.g. 224) or backbone"
        ) from None
    finally:
        model.train(was_training)


def build_optimizer(setup: TrainingSetup):
    cfg = setup.config
    groups = param_groups(setup.model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    fused = setup.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    warmup = int(math.ceil(cfg.warmup_epochs * setup.steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(setup.total_steps, warmup))
    return optimizer, scheduler
