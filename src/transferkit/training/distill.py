"""Knowledge distillation: training with teachers (`transferkit distill`, or `train --teachers`).

Teachers are finished runs; the student is an ordinary run (one backbone, one head per label space) whose
heads come from the teachers. Per step, on every image of the batch (labelled, and unlabeled with
`--unlabeled`):

    loss = kd_weight * sum_h w_h * T^2 * mean_images KL(q_h || softmax(z_h / T))
         + (1 - kd_weight) * sum_h w_h * cross-entropy of head h on its own labelled images

q_h is the mean of the softened probabilities of the teacher heads mapped onto student head h, z_h the
student's logits, w_h the head weight. The T^2 factor keeps the gradient of the soft part at the scale of
the hard part whatever T (Hinton et al., 2015). Every head learns from every image: the teachers' answers
on another dataset's images (and on unlabeled ones) are knowledge too, and they are what an unlabeled image
trains through. The training step computing it is DistillationStep (steps.py).

Heads. Label spaces are matched by class names exactly as training matches datasets (training/labels.py):
every teacher head is planned like a dataset with `heads: shared`, so teacher heads whose canonical
class-name sets are equal become one student head (named after the first, in its class order), and each
teacher head's logits are permuted into that order. Each `--data` dataset then trains the student head
whose class names are its own, so cross-entropy and validation work as in plain training.

How a teacher sees a batch. The training pool holds uint8 pixels at the student's size (PIL-resized once at
load, preprocess.py), and each step augments them on the device in 0..1 space before normalising. The
teacher is given that same augmented 0..1 tensor, resized on the device to its own input size (bilinear,
antialiased, which is what PIL's bilinear filter does when it shrinks) and normalised with its own
mean/std. So its soft targets describe exactly the view the student is scored on, at the cost of one
interpolate per teacher; a second, un-augmented pool at each teacher's size would cost memory per teacher
and give targets for a view the student never sees. A teacher larger than the student therefore sees the
student's detail upsampled (benchmarks/distill.py reports the teachers' accuracy fed that way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferkit.config import TrainConfig
from transferkit.data import ImageDataset
from transferkit.errors import ConfigError
from transferkit.preprocess import Preprocessing
from transferkit.runs import Labels, load_run, load_run_model
from transferkit.training.checkpoint import load_checkpoint
from transferkit.training.labels import HeadPlan, LabelMap, class_index_map, plan_heads
from transferkit.training.losses import masked_head_losses
from transferkit.training.pools import Pool, _pool
from transferkit.training.precision import forward, model_input


@dataclass
class Teacher:
    dir: Path
    model: torch.nn.Module  # MultiHeadModel in eval mode, on the training device
    preprocessing: Preprocessing
    # (student head, teacher head, for each student class the teacher's class index); a list, not a dict: a
    # teacher trained with --heads separate may have two heads with one class set, and both teach
    routes: list[tuple[str, str, torch.Tensor]] = field(default_factory=list)

    def logits(self, x_unit: torch.Tensor) -> dict[str, torch.Tensor]:
        """This teacher's logits for the student's augmented batch (float (N,3,S,S) in 0..1), seen at its own
        size and statistics."""
        return forward(self.model, self.preprocessing, resized(x_unit, self.preprocessing.image_size))


def resized(x_unit: torch.Tensor, size: int) -> torch.Tensor:
    """A 0..1 batch at `size` x `size`: bilinear and antialiased, as PIL's bilinear filter shrinks."""
    if tuple(x_unit.shape[-2:]) != (size, size):
        x_unit = F.interpolate(x_unit, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x_unit


def teacher_input(x_unit: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """The student's augmented batch as the model input of a teacher with preprocessing `pre`."""
    return model_input(pre, resized(x_unit, pre.image_size))


def check_teacher(path: str | Path) -> None:
    """A teacher must be a run that finished training: its model.pt is then the best epoch of a complete
    schedule, not of a run interrupted half-way."""
    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"teacher {d} does not exist; pass the run folder printed by `transferkit train`")
    try:
        load_run(d)
    except Exception as exc:  # noqa: BLE001 - not a run directory: say so with the reason
        raise ConfigError(f"teacher {d} is not a transferkit run ({exc})") from None
    if not (d / "model.pt").is_file():
        raise ConfigError(f"teacher {d} has no model.pt yet; finish it first with `transferkit train --resume {d}`")
    state = load_checkpoint(d)
    if state is not None and not state.get("finished", False):
        raise ConfigError(
            f"teacher {d} has not finished training (checkpoint at epoch {state.get('epoch', 0) + 1}); "
            f"finish it first with `transferkit train --resume {d}`"
        )


def teacher_labels(config: TrainConfig) -> list[Labels]:
    return [load_run(t).labels for t in config.teachers]


def _teacher_head_entries(labels: list[Labels]) -> list[tuple[str, int, str, list[str]]]:
    """(unique key, teacher index, teacher head, classes) for every head of every teacher, in order. The key
    names the student head a new class set creates: the teacher's head name, suffixed when an earlier teacher
    used that name for other classes."""
    entries, used = [], set()
    for t, lab in enumerate(labels):
        for head, classes in lab.heads.items():
            key, k = head, 2
            while key in used:
                key, k = f"{head}-{k}", k + 1
            used.add(key)
            entries.append((key, t, head, list(classes)))
    return entries


def _merge(labels: list[Labels], label_map: LabelMap):
    """-> (teacher head entries, their plan: student heads, and entry key -> student head)."""
    entries = _teacher_head_entries(labels)
    return entries, plan_heads([(key, classes) for key, _, _, classes in entries], "shared", label_map)


def plan_student_heads(
    labels: list[Labels], datasets: list[tuple[str, list[str]]], label_map: LabelMap
) -> tuple[HeadPlan, dict[str, list[tuple[int, str]]]]:
    """-> (the student's HeadPlan: heads from the teachers, each dataset on the head with its class names;
    {student head: [(teacher index, teacher head)]})."""
    entries, merged = _merge(labels, label_map)
    heads = merged.labels.heads
    sources: dict[str, list[tuple[int, str]]] = {h: [] for h in heads}
    for key, t, head, _ in entries:
        sources[merged.labels.datasets[key]].append((t, head))
    canon = {h: frozenset(label_map.canonical(c) for c in classes) for h, classes in heads.items()}
    assignment, remap = {}, {}
    for name, classes in datasets:
        names = [label_map.canonical(c) for c in classes]
        target = next((h for h, key in canon.items() if key == frozenset(names)), None)
        if target is None or len(set(names)) != len(names):
            raise ConfigError(
                f"dataset {name}: no teacher head has its class names {classes[:5]}{'…' if len(classes) > 5 else ''} "
                f"(teacher heads: {', '.join(f'{h} {c[:3]}…' for h, c in heads.items())}); add a teacher trained "
                f"on it, map names with --label-map, or drop it from --data"
            )
        head_names = [label_map.canonical(c) for c in heads[target]]
        assignment[name] = target
        remap[name] = [head_names.index(c) for c in names]
    return HeadPlan(Labels(heads=heads, datasets=assignment), remap), sources


def load_teachers(config: TrainConfig, device: torch.device) -> list[Teacher]:
    """Check and load every teacher (eval mode, on `device`) with its routes into the student's heads.

    Called before the training seed is set: building a model draws initial weights from the global RNG,
    which must not shift the student's initialisation or, on resume, the restored RNG state."""
    for path in config.teachers:
        check_teacher(path)
    label_map = LabelMap.from_file(config.label_map)
    entries, merged = _merge(teacher_labels(config), label_map)
    teachers = []
    for t, path in enumerate(config.teachers):
        with torch.random.fork_rng(devices=[]):
            model, run = load_run_model(path)
        model.to(device, memory_format=torch.channels_last).eval()
        model.requires_grad_(False)
        teacher = Teacher(Path(path), model, run.preprocessing)
        for key, index, head, classes in entries:
            if index != t:
                continue
            student_head = merged.labels.datasets[key]
            order = class_index_map(merged.labels.heads[student_head], classes, label_map)  # student -> teacher
            idx = torch.tensor([order[i] for i in range(len(order))], device=device)
            teacher.routes.append((student_head, head, idx))
        teachers.append(teacher)
    return teachers


@torch.no_grad()
def soft_targets(teachers: list[Teacher], x_unit: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """{student head: (N, classes) mean over its teachers of softmax(teacher logits / T), in the student
    head's class order}. Each teacher runs in eval mode on its own input size and statistics."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for teacher in teachers:
        logits = teacher.logits(x_unit)
        for head, teacher_head, order in teacher.routes:
            probs = (logits[teacher_head].float()[:, order] / temperature).softmax(1)
            sums[head] = sums[head] + probs if head in sums else probs
            counts[head] = counts.get(head, 0) + 1
    return {head: total / counts[head] for head, total in sums.items()}


def describe_teachers(teachers: list[Teacher], student_size: int) -> list[str]:
    lines = []
    for t in teachers:
        routes = ", ".join(f"{th} -> {sh}" for sh, th, _ in t.routes)
        lines.append(f"distill: teacher {t.dir} ({t.preprocessing.image_size}px; student {student_size}px): {routes}")
    return lines


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x mean over rows of KL(targets || softmax(student_logits / T)); `targets` are probabilities."""
    log_p = torch.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (torch.special.xlogy(targets, targets) - targets * log_p).sum(1)  # 0 log 0 = 0
    return kl.mean() * temperature**2


def distillation_loss(
    logits: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    labels: torch.Tensor,
    head_ids: torch.Tensor,
    head_order: list[str],
    head_weights: list[float],
    class_weights: list[torch.Tensor | None],
    temperature: float,
    kd_weight: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (total loss, the KD part (weighted sum over heads, before kd_weight), per-image correctness).

    `head_ids` is -1 for unlabeled images: they enter the KD part only."""
    ce, correct = masked_head_losses(logits, labels, head_ids, head_order, head_weights, class_weights, label_smoothing)
    kd = ce.new_zeros(())
    for h, name in enumerate(head_order):
        if name in targets:
            kd = kd + head_weights[h] * kd_loss(logits[name], targets[name], temperature)
    return kd_weight * kd + (1.0 - kd_weight) * ce, kd, correct


def teacher_only_pool(
    datasets: list[tuple[ImageDataset, str | None]], pre: Preprocessing, device, workers: int = 2
) -> Pool:
    """Unlabeled images for distillation: no head and no label (-1); the teachers label every head."""
    parts = [ds.train for ds, _ in datasets]
    labels = [np.full(len(p), -1, dtype=np.int64) for p in parts]
    return _pool(parts, labels, [-1] * len(parts), pre, device, workers)
