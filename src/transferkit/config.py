"""Typed training configuration: YAML in, validated, resolved YAML out beside every run.

Every field has a default and a comment saying why. Unknown keys and bad values are refused with a
message naming the key and the fix, before any data is loaded or any weight is touched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from transferkit.artifact import check_device
from transferkit.errors import ConfigError

AUGMENTS = ("default", "robust", "none")  # TrainConfig.augment: training/augment.py applies them
ADVERSARIAL = ("none", "fgsm")  # TrainConfig.adversarial_training: training/adversarial.py


@dataclass
class TrainConfig:
    # ---- data ----
    data: list[str] = field(default_factory=list)  # registry names or imagefolder:PATH (with --init: that run's)
    unlabeled: list[str] = field(default_factory=list)  # NAME[=HEAD] or traffic:DIR[=HEAD]: images used without labels
    # small sizes keep CPU runs quick; auto is stored as the number it picks (timm: pretrained_cfg's input_size)
    image_size: int = 64  # square input side; auto: the backbone's pretrained input size (224 for most)
    limit: int | None = None  # cap images per split per dataset, for quick runs
    sampling: str = "proportional"  # proportional | balanced | temperature:ALPHA (p_i ∝ n_i^ALPHA)
    heads: str = "shared"  # shared: datasets with identical class names train one head; separate: one each
    head_weights: list[float] | None = None  # loss weight per head (in head order); default 1.0 each
    label_map: str | None = None  # YAML/JSON file {synonym: canonical class name} applied before matching
    # How labelled images are augmented, on the device (training/augment.py, robust_augment.py; docs/robustness.md
    # measures robust against default). Pseudo-labelling's weak and strong views of unlabeled images are the same
    # whichever is chosen. Configs written when this was a switch say true or false: default and none.
    augment: str = "default"  # default: random shifts; robust: shifts, AugMix-style mix, training-only noise; none
    # AugMix's severity: each operation's magnitude is drawn up to severity/10 of its maximum (docs/guide-training.md
    # compares 3, AugMix's default, and 6 on the validation split: more corruption accuracy, more clean accuracy lost)
    augment_severity: int = 3  # with --augment robust: 1 (mild) to 10
    # Views per image (training/consistency.py): 0, the robust view replaces the image; K >= 1, every labelled image
    # is trained as its shifted view and K robust views of it, cross-entropy on each (K + 1 passes through the
    # model per image). The shifted view keeps clean accuracy where the mix alone costs it (docs/robustness.md). Old
    # configs have no such key: 0, as they trained.
    robust_views: int = 0  # with --augment robust: 0 to 4
    consistency_weight: float = 0.0  # with --robust-views: AugMix's Jensen-Shannon term among the views (its 12)
    # ---- model ----
    backbone: str = "mobilenet_v2"  # a torchvision classification model name, or timm/NAME (backbones/)
    # a file is a state dict or checkpoint (.pth/.pt/.bin/.safetensors); its sha256 goes in the run's weights.json
    weights: str = "imagenet"  # imagenet | none | PATH | torchvision weights name (IMAGENET1K_V2) | timm tag (ra_in1k)
    init: str | None = None  # RUN dir to start from (sequential transfer): backbone + heads with matching classes
    # ---- optimisation ----
    epochs: int = 3  # one epoch draws as many images as the labelled train splits hold (each once if proportional)
    # split across processes under torchrun; auto is measured on a CPU (training/memory.py), 128 on a GPU
    batch_size: int = 0  # images per optimiser step; auto (0): the largest up to 128 whose step fits --max-memory-gb
    lr: float = 1e-3  # AdamW peak learning rate (of the heads when layer_decay is set)
    weight_decay: float = 0.01  # AdamW decay of weight matrices (not biases or norms), against over-fitting
    warmup_epochs: float = 0.5  # linear warm-up, then cosine decay to zero
    label_smoothing: float = 0.0  # target share spread over all classes (e.g. 0.1): less over-confident heads
    freeze_epochs: int = 0  # train heads only for N epochs (backbone and its BatchNorm statistics frozen)
    layer_decay: float | None = None  # lr multiplier per block from head to stem (e.g. 0.7); None = same lr
    ema: float | None = None  # EMA decay of weights (e.g. 0.999); evaluated and exported with EMA weights
    grad_accum: int = 1  # micro-batches per optimiser step
    clip_grad: float | None = 1.0  # max gradient norm; None disables clipping
    class_weights: str = "none"  # none | auto (inverse class frequency, for imbalanced data)
    early_stop: int | None = None  # stop after N epochs without a better validation accuracy
    # Before each validation (so before model.pt, export and serving) BatchNorm's running statistics are
    # recomputed over up to this many training images, un-augmented (training/precise_bn.py): after the few
    # dozen steps a small dataset trains, the running ones are still mostly ImageNet's. 0: off, as before.
    precise_bn: int = 1024  # training images BatchNorm statistics are recomputed over at each epoch end; 0: off
    # ---- pseudo-labelling (FixMatch-style) ----
    pseudo_threshold: float = 0.95  # keep a pseudo-label only above this confidence
    unlabeled_weight: float = 1.0  # weight of the unlabeled loss after ramp-up
    # A head still learning its labelled data labels target images confidently and wrongly, and the errors
    # reinforce themselves: pseudo-labels start after this fraction of training (MNIST->digits, 32 px, no
    # distribution alignment: digits accuracy 38% when they start at once, 76% when they start after a third).
    unlabeled_start: float = 0.3  # fraction of training before pseudo-labels are used at all
    unlabeled_rampup: float = 0.2  # fraction of training over which their weight then ramps up linearly
    unlabeled_ratio: int = 1  # unlabeled images per labelled image in a step
    distribution_alignment: bool = True  # align pseudo-label class frequencies with the labelled prior
    # ---- adaptation to the unlabeled images (training/adaptation.py, rounds.py; docs/adaptation.md) ----
    # Used only with --unlabeled (distillation's teachers label for themselves); each part is switched off on
    # its own; benchmarks/transfer.py section e measures what each one adds.
    adapt_bn: bool = True  # pseudo-label with BatchNorm statistics of the unlabeled images (AdaBN)
    teacher_ema: float = 0.9  # pseudo-labels from an EMA of the weights, this decay per step (mean teacher); 0: off
    rounds: int = 3  # self-training rounds: each after the first continues from the last, learning its labels
    round_epochs: int = 1  # epochs of each round after the first (`epochs` is the first round's)
    round_keep: float = 0.8  # share of each predicted class's most confident unlabeled images labelled per round
    # ---- distillation (`transferkit distill`: training with teachers, see training/distill.py) ----
    teachers: list[str] = field(default_factory=list)  # finished RUN dirs whose heads teach the student (soft targets)
    # T=1 with kd_weight 0.5 beat the textbook T=4 / 0.9 on Fashion-MNIST by 1.7 points (6 epochs, 32 px student,
    # docs/distill.md keeps the comparison): over short schedules the softened targets of T=4 teach too slowly
    temperature: float = 1.0  # softens teacher and student distributions in the KD loss, which is scaled by T^2
    kd_weight: float = 0.5  # loss = kd_weight x KD (every image) + (1 - kd_weight) x cross-entropy (labelled images)
    # ---- adversarial training (training/adversarial.py) ----
    adversarial_training: str = "none"  # none | fgsm: train on FGSM images (random start) of the augmented view
    adversarial_eps: str = "2/255"  # with --adversarial-training: L-infinity budget on the 0..1 pixel scale
    # ---- system ----
    seed: int = 0  # same seed, same result on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model (CUDA)
    workers: int = 2  # DataLoader worker processes decoding image folders streamed from disk
    max_in_memory_gb: float = 8.0  # a training split larger than this (decoded uint8) streams from disk
    max_memory_gb: float = 0.0  # --batch-size auto: RAM one training step may take; 0: half of what is available
    checkpoint_every: int = 200  # optimiser steps between checkpoints (also one at each epoch end)
    tensorboard: bool = False  # also write TensorBoard event files to RUN/tensorboard
    track: str | None = None  # mlflow:URI: also log the config, every metric and the run's files to MLflow
    out: str | None = None  # run directory; default runs/<datasets>-<time>

    # ---------------------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        from transferkit.data import DatasetSpec, check_dataset_name

        if not self.data and self.init:  # adapting a run: its labelled data stays in the mix, so nothing is forgotten
            self.data = _init_run_data(self.init)
        if not self.data:
            raise ConfigError("no datasets given; pass --data mnist,fashion-mnist (or data: [...] in the config)")
        if len(set(self.data)) != len(self.data):
            raise ConfigError(f"data lists a dataset twice: {self.data}")
        for text in self.data:
            if DatasetSpec.parse(text, with_head=False).traffic is not None:
                raise ConfigError(f"{text} is captured traffic, which has no labels; pass it with --unlabeled {text}")
        names = [check_dataset_name(s).name for s in self.data]
        if len(set(names)) != len(names):
            raise ConfigError(f"two datasets have the same name {names}; rename one image folder")
        for text in self.unlabeled:
            _check_unlabeled(DatasetSpec.parse(text))
        _positive(self, "epochs", "grad_accum", "unlabeled_ratio", "checkpoint_every")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size must be a positive number of images or auto, got {self.batch_size}")
        if self.max_memory_gb < 0:
            raise ConfigError(f"max_memory_gb must be >= 0 (0: half the available RAM), got {self.max_memory_gb}")
        if self.image_size < 0:
            raise ConfigError(f"image_size must be a number of pixels or auto, got {self.image_size}")
        if self.image_size != 0 and self.image_size < 16:  # 0: auto, resolved below
            raise ConfigError(f"image_size {self.image_size} is too small; use 16 or more (32-64 for quick runs)")
        if self.workers < 0 or self.max_in_memory_gb < 0:
            raise ConfigError("workers and max_in_memory_gb must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        parse_sampling(self.sampling)
        if self.augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if not 1 <= self.augment_severity <= 10:
            raise ConfigError(f"augment_severity must be 1 to 10 (AugMix's scale), got {self.augment_severity}")
        if self.augment_severity != TrainConfig.augment_severity and self.augment != "robust":
            raise ConfigError("augment_severity sets the strength of --augment robust; add --augment robust or drop it")
        _check_views(self)
        _check_adversarial(self)
        if self.heads not in ("shared", "separate"):
            raise ConfigError(f"heads must be shared or separate, got {self.heads!r}")
        if self.class_weights not in ("none", "auto"):
            raise ConfigError(f"class_weights must be none or auto, got {self.class_weights!r}")
        if not 0.0 <= self.pseudo_threshold <= 1.0:
            raise ConfigError(f"pseudo_threshold must be in [0, 1], got {self.pseudo_threshold}")
        if not (0.0 <= self.unlabeled_start < 1.0 and 0.0 <= self.unlabeled_rampup <= 1.0):
            raise ConfigError(
                "unlabeled_start must be in [0, 1) and unlabeled_rampup in [0, 1] (fractions of training)"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"ema must be in (0, 1), e.g. 0.999; got {self.ema}")
        if self.freeze_epochs < 0 or self.freeze_epochs > self.epochs:
            raise ConfigError(f"freeze_epochs must be in [0, epochs={self.epochs}], got {self.freeze_epochs}")
        if self.precise_bn < 0:
            raise ConfigError(f"precise_bn must be >= 0 images (0: off; default 1024), got {self.precise_bn}")
        if self.early_stop is not None and self.early_stop < 1:
            raise ConfigError(f"early_stop must be >= 1 epoch, got {self.early_stop}")
        if self.head_weights is not None and any(w < 0 for w in self.head_weights):
            raise ConfigError(f"head_weights must be >= 0, got {self.head_weights}")
        _check_head_weight_count(self.head_weights, self.heads, names)
        check_device(self.device, allow_auto=True)
        _check_distillation(self)
        _check_adaptation(self)
        for path_field in ("label_map", "init"):
            value = getattr(self, path_field)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"{path_field}: {value} does not exist")
        from transferkit.backbones import check_backbone, native_input_size
        from transferkit.tracking import check_track

        check_backbone(self.backbone, self.weights)
        check_track(self.track)
        if self.image_size == 0:  # --image-size auto: what the weights were trained at, recorded as a number
            self.image_size = native_input_size(self.backbone, self.weights)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from transferkit.utils import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def parse_sampling(spec: str) -> float:
    """Sampling spec -> the temperature exponent alpha: proportional=1, balanced=0, temperature:A=A."""
    if spec == "proportional":
        return 1.0
    if spec == "balanced":
        return 0.0
    m = re.fullmatch(r"temperature:([0-9]*\.?[0-9]+)", spec)
    if m:
        return float(m.group(1))
    raise ConfigError(
        f"sampling must be proportional, balanced or temperature:ALPHA (e.g. temperature:0.5), got {spec!r}"
    )


def adversarial_eps(cfg: TrainConfig) -> float:
    """The adversarial budget as a number: `2/255` or `0.008`, as `transferkit eval --eps` writes budgets."""
    try:
        return float(Fraction(cfg.adversarial_eps.replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"adversarial_eps must be one budget on the 0..1 pixel scale, a fraction or a decimal (e.g. 2/255 or "
            f"0.008), got {cfg.adversarial_eps!r}"
        ) from None


def _check_views(cfg: TrainConfig) -> None:
    if not 0 <= cfg.robust_views <= 4:
        raise ConfigError(f"robust_views must be 0 to 4 (each costs one more pass per image), got {cfg.robust_views}")
    if not cfg.consistency_weight >= 0:
        raise ConfigError(f"consistency_weight must be >= 0, got {cfg.consistency_weight}")
    if cfg.consistency_weight and not cfg.robust_views:
        raise ConfigError("consistency_weight compares the views of --robust-views; add --robust-views 2 or drop it")
    if not cfg.robust_views:
        return
    if cfg.augment != "robust":
        raise ConfigError("robust_views trains robust views beside each image; add --augment robust or drop it")
    if cfg.adversarial_training != "none":
        raise ConfigError("robust_views and adversarial_training each change what the loss is taken on; choose one")
    if cfg.teachers:
        raise ConfigError("robust_views applies to the labelled images of plain training; drop it or the teachers")


def _check_adversarial(cfg: TrainConfig) -> None:
    if cfg.adversarial_training not in ADVERSARIAL:
        raise ConfigError(
            f"adversarial_training must be one of {', '.join(ADVERSARIAL)}, got {cfg.adversarial_training!r}"
        )
    eps = adversarial_eps(cfg)
    if cfg.adversarial_training == "none":
        return
    if not 0.0 < eps <= 16 / 255:
        raise ConfigError(
            f"adversarial_eps must be above 0 and at most 16/255 (a perturbation still smaller than the image's own "
            f"detail), got {cfg.adversarial_eps}; 2/255 is a usual start"
        )
    if cfg.teachers:
        raise ConfigError(
            "adversarial_training applies to the labelled images of plain training; drop it or the teachers"
        )


def _check_head_weight_count(head_weights: list[float] | None, heads: str, datasets: list[str]) -> None:
    """Every dataset trains exactly one head, so `separate` has one head per dataset and `shared` at most
    that many. How many `shared` makes depends on the datasets' class names, known once they are loaded:
    TrainingSetup checks the exact count then."""
    if head_weights is None:
        return
    n = len(head_weights)
    if heads == "separate" and n != len(datasets):
        raise ConfigError(
            f"head_weights has {n} values but there are {len(datasets)} heads (one per dataset: {datasets})"
        )
    if n > len(datasets):
        raise ConfigError(
            f"head_weights has {n} values but there can be at most {len(datasets)} heads (one per dataset: {datasets})"
        )


def _check_distillation(cfg: TrainConfig) -> None:
    """The numbers and paths alone; that each teacher is a finished run is checked when it is loaded
    (training/distill.py), still before any data."""
    if not cfg.temperature > 0:
        raise ConfigError(f"temperature must be > 0 (e.g. 4: softer teacher targets), got {cfg.temperature}")
    if not 0.0 <= cfg.kd_weight <= 1.0:
        raise ConfigError(f"kd_weight must be in [0, 1] (1: teachers only, 0: labels only), got {cfg.kd_weight}")
    if not cfg.teachers:
        return
    if len(set(cfg.teachers)) != len(cfg.teachers):
        raise ConfigError(f"teachers lists a run twice: {cfg.teachers}")
    if cfg.heads != "shared":
        raise ConfigError(
            "distillation takes its heads from the teachers, merged by class names; drop --heads separate"
        )
    for teacher in cfg.teachers:
        if not Path(teacher).expanduser().is_dir():
            raise ConfigError(
                f"teacher {teacher} does not exist; pass the folder of a finished run (printed by `transferkit train`), "
                f"or put it back there to continue a distillation that names it"
            )
    from transferkit.data import DatasetSpec

    if any(DatasetSpec.parse(text).head for text in cfg.unlabeled):
        raise ConfigError(
            "in distillation unlabeled images train every head through the teachers; drop =HEAD from --unlabeled"
        )


def _init_run_data(init: str) -> list[str]:
    """The labelled datasets of the run at `init` (its config.yaml), for `train --init RUN` without --data."""
    path = Path(init).expanduser() / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"init: {init} has no config.yaml; pass the folder of a finished run, or give --data")
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or []
    if not data:
        raise ConfigError(f"init: {path} names no datasets; give --data")
    return [str(d) for d in data]


def _check_unlabeled(spec) -> None:
    """An unlabeled dataset exists, and captured traffic says (or its capture shows) which head labels it."""
    from transferkit.data import check_dataset_name
    from transferkit.data.captured import captured_heads

    check_dataset_name(spec.without_head())
    if spec.traffic is not None and spec.head is None and len(heads := captured_heads(spec.traffic)) != 1:
        raise ConfigError(
            f"{spec}: the capture holds the answers of heads {heads}; name the one its images belong to, "
            f"e.g. --unlabeled {spec}={heads[0] if heads else 'HEAD'}"
        )


def _check_adaptation(cfg: TrainConfig) -> None:
    if not 0.0 <= cfg.teacher_ema < 1.0:
        raise ConfigError(
            f"teacher_ema must be in [0, 1) (e.g. 0.99; 0 turns the mean teacher off), got {cfg.teacher_ema}"
        )
    if cfg.rounds < 1:
        raise ConfigError(f"rounds must be >= 1 (1: no self-training rounds), got {cfg.rounds}")
    if cfg.round_epochs < 1:
        raise ConfigError(f"round_epochs must be >= 1, got {cfg.round_epochs}")
    if not 0.0 < cfg.round_keep <= 1.0:
        raise ConfigError(f"round_keep must be in (0, 1] (share of each class's images kept), got {cfg.round_keep}")


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from plain values, checking keys and types (ints are accepted as floats)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    hints = get_type_hints(TrainConfig)
    clean = {}
    for key, value in values.items():
        clean[key] = _coerce(key, value, hints[key], source)
    return TrainConfig(**clean)


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    text = str(hint)
    if key == "image_size" and isinstance(value, str) and value.strip().lower() == "auto":
        return 0  # the backbone's own input size, resolved by TrainConfig.validate (a number in config.yaml)
    if key == "batch_size" and isinstance(value, str) and value.strip().lower() == "auto":
        return 0  # resolved when the model is built (training/memory.py)
    if key == "augment" and isinstance(value, bool):
        return "default" if value else "none"  # configs written before augment took a name: old runs resume
    if key == "adversarial_eps" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))  # a budget given as a number (0.008) rather than as text (2/255)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{source}: {key} may not be null")
    if "list[str]" in text:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {key} must be a list of names, got {value!r}")
        return value
    if "list[float]" in text:
        if isinstance(value, str):
            value = value.split(",")
        try:
            numbers = [float(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key} must be a list of numbers, got {value!r}") from None
        if not all(math.isfinite(v) for v in numbers):
            raise ConfigError(f"{source}: {key} must be finite numbers, got {value!r}")
        return numbers
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    for typ in (int, float):
        if typ.__name__ in text.split(" | ")[0] or text.startswith(f"{typ.__name__} |"):
            if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and value != int(value)):
                raise ConfigError(
                    f"{source}: {key} must be {'an integer' if typ is int else 'a number'}, got {value!r}"
                )
            return typ(value)
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        values = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: expected a mapping of keys to values at the top level")
    return values
