"""Everything a training run needs before its first step: data, heads, model, optimiser, schedule.

Kept apart from the loop (trainer.py) so that `eval`, tests and benchmarks can build the same pieces.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import torch

from transferkit.backbones import create_backbone
from transferkit.backbones.weights_file import describe as describe_weights
from transferkit.config import TrainConfig, parse_sampling
from transferkit.data import DatasetSpec, ImageDataset, load_dataset
from transferkit.data.captured import captured_heads
from transferkit.errors import ConfigError
from transferkit.model import MultiHeadModel
from transferkit.preprocess import Preprocessing
from transferkit.training.batch_size import auto_batch_size
from transferkit.training.distill import plan_student_heads, teacher_labels, teacher_only_pool
from transferkit.training.labels import HeadPlan, LabelMap, plan_heads
from transferkit.training.losses import DistributionAlignment, auto_class_weights
from transferkit.training.optim import param_groups, warmup_cosine
from transferkit.training.pools import Pool, labelled_pool, unlabeled_pool
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
    unlabeled: Pool | None = None
    unlabeled_sampler: CyclingSampler | None = None
    unlabeled_heads: dict[str, str] = field(default_factory=dict)  # unlabeled dataset -> head labelling it
    alignment: DistributionAlignment | None = None
    head_weights: list[float] = field(default_factory=list)
    class_weights: list[torch.Tensor | None] = field(default_factory=list)
    weights: dict = field(default_factory=dict)  # where the backbone's weights came from (weights.json)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


def load_datasets(
    config: TrainConfig, pre: Preprocessing
) -> tuple[list[ImageDataset], list[tuple[ImageDataset, str | None]]]:
    """-> (labelled datasets, [(unlabeled dataset, the head it names or None)])."""
    budget = int(config.max_in_memory_gb * 2**30)
    labelled = [load_dataset(DatasetSpec.parse(s, with_head=False), pre, config.limit, budget) for s in config.data]
    unlabeled = []
    for text in config.unlabeled:
        spec = DatasetSpec.parse(text)
        head = spec.head
        if spec.traffic is not None and head is None:  # the head that answered it when served (config checked: one)
            head = captured_heads(spec.traffic)[0]
        unlabeled.append((load_dataset(spec.without_head(), pre, config.limit, budget), head))
    return labelled, unlabeled


def build_setup(config: TrainConfig, device: torch.device) -> TrainingSetup:
    """Load data, plan heads, build the model on `device`. The config must already be validated."""
    label_map = LabelMap.from_file(config.label_map)
    # the backbone first: one that cannot take the image size is refused before any image is decoded
    backbone = create_backbone(config.backbone, config.weights)
    backbone.check_input_size(config.image_size)
    for line in describe_weights(backbone.weights):
        print(f"transferkit: {line}", file=sys.stderr, flush=True)
    pre = backbone.preprocessing(config.image_size)
    datasets, unlabeled_specs = load_datasets(config, pre)
    if config.teachers:  # distillation: the heads are the teachers', each dataset on the one with its classes
        plan, _ = plan_student_heads(teacher_labels(config), [(d.name, d.classes) for d in datasets], label_map)
    else:
        plan = plan_heads([(d.name, d.classes) for d in datasets], config.heads, label_map)
    plan.labels.specs = {d.name: str(d.spec) for d in datasets}
    # how many heads `shared` makes depends on the class names just loaded (config.validate checks the bounds)
    if config.head_weights is not None and len(config.head_weights) != len(plan.labels.heads):
        raise ConfigError(
            f"head_weights has {len(config.head_weights)} values but there are {len(plan.labels.heads)} heads "
            f"{list(plan.labels.heads)}"
        )
    model = MultiHeadModel(backbone, plan.labels.heads, config.image_size)
    head_order = model.head_names
    # channels_last: ~2x faster convolutions on CPU (oneDNN) and the layout tensor cores want on GPU
    model.to(device, memory_format=torch.channels_last)
    if config.batch_size == 0:  # --batch-size auto: measured here, recorded in the run's config.yaml
        config.batch_size, how = auto_batch_size(
            model,
            config.image_size,
            device,
            config.max_memory_gb,
            int(os.environ.get("WORLD_SIZE", "1")) > 1,
            images=sum(len(d.train) for d in datasets),
            epochs=config.epochs,
            views=1 + config.robust_views,
        )
        print(f"transferkit: {how}", file=sys.stderr, flush=True)
    pool = labelled_pool(datasets, plan, head_order, pre, device, config.workers)
    sampler = MultiDatasetSampler(pool.sizes, config.batch_size, parse_sampling(config.sampling), config.seed)
    setup = TrainingSetup(config, device, pre, datasets, plan, label_map, head_order, model, pool, sampler)
    setup.weights = {"backbone": config.backbone, "weights": config.weights, **backbone.weights}
    if unlabeled_specs and config.teachers:  # distillation: the teachers label every head, no head to match
        setup.unlabeled = teacher_only_pool(unlabeled_specs, pre, device, config.workers)
        setup.unlabeled_sampler = CyclingSampler(
            len(setup.unlabeled.labels), config.batch_size * config.unlabeled_ratio, config.seed
        )
    elif unlabeled_specs:
        setup.unlabeled, setup.unlabeled_heads = unlabeled_pool(
            unlabeled_specs, plan, head_order, label_map, pre, device, config.workers
        )
        setup.unlabeled_sampler = CyclingSampler(
            len(setup.unlabeled.labels), config.batch_size * config.unlabeled_ratio, config.seed
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


def build_optimizer(setup: TrainingSetup):
    cfg = setup.config
    groups = param_groups(setup.model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    fused = setup.device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    warmup = int(math.ceil(cfg.warmup_epochs * setup.steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(setup.total_steps, warmup))
    return optimizer, scheduler
