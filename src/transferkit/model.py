"""A shared pretrained backbone with one linear head per label space, and the graph that is exported.

Any torchvision classification model works as a backbone: its final ImageNet classifier (the last
`nn.Linear` with 1000 outputs) is replaced by an identity, and the features it took become the input of
our heads. Like timm's `pretrained_cfg`, the model carries its input definition (`model.preprocessing`):
mean/std come from the weights' own transforms, never re-typed, so no caller has to pass them along.
"""

from __future__ import annotations

import re
import urllib.error
from dataclasses import dataclass

import torch
from torch import nn

from transferkit.errors import ConfigError, TransferkitError
from transferkit.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

# torchvision's default for some models (e.g. mobilenet_v2) is a V2 recipe; V1 is the classic transfer
# baseline and the one `make setup` installs offline, so `imagenet` means V1 where it exists.
_PREFERRED_IMAGENET = ("IMAGENET1K_V1", "DEFAULT")


def head_name(dataset_name: str) -> str:
    """A dataset name as a head key: usable in nn.ModuleDict, ONNX output names and JSON."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", dataset_name).strip("_") or "head"


def resolve_weights(backbone: str, weights: str):
    """`imagenet` | `none` | a torchvision weights enum name -> a weights enum member or None."""
    import torchvision

    if backbone not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"unknown backbone {backbone!r}; use a torchvision classification model name, "
            f"e.g. mobilenet_v2, resnet18, efficientnet_b0, convnext_tiny"
        )
    if weights == "none":
        return None
    enum = torchvision.models.get_model_weights(backbone)
    names = [w.name for w in enum] + ["DEFAULT"]
    wanted = _PREFERRED_IMAGENET if weights == "imagenet" else (weights,)
    for name in wanted:
        if name in names:
            return enum[name] if name != "DEFAULT" else enum.DEFAULT
    raise ConfigError(f"backbone {backbone} has no weights {weights!r}; use imagenet, none or one of {names}")


@dataclass
class Backbone:
    """A torchvision model without its classifier, and the input statistics its weights were trained with."""

    name: str
    module: nn.Module
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def preprocessing(self, image_size: int) -> Preprocessing:
        return Preprocessing(image_size=image_size, mean=self.mean, std=self.std, jpeg_draft=True)

    @torch.no_grad()
    def check_input_size(self, image_size: int) -> None:
        """A dry forward pass, so a backbone that cannot take this input size (ViT and Swin want 224 px, say)
        is refused with the reason before any data is loaded, not deep inside the first training step."""
        was_training = self.module.training
        self.module.eval()
        try:
            self.module(torch.zeros(1, 3, image_size, image_size))
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"backbone {self.name} cannot take {image_size}px inputs ({str(exc).splitlines()[0]}); "
                f"pick another --image-size (e.g. 224) or backbone"
            ) from None
        finally:
            self.module.train(was_training)


def create_backbone(backbone: str, weights: str) -> Backbone:
    """Build a torchvision model without its classifier."""
    import torchvision

    w = resolve_weights(backbone, weights)
    try:
        model = torchvision.models.get_model(backbone, weights=w)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        if w is None:
            raise
        raise TransferkitError(
            f"could not load {backbone} weights {w.name}: not in torch's hub cache and the download failed "
            f"({type(exc).__name__}); connect once so torchvision can fetch {w.url.rsplit('/', 1)[-1]}, place that "
            f"file in $TORCH_HOME/hub/checkpoints (`make setup` does this for mobilenet_v2), or pass --weights none"
        ) from None
    feature_dim = _strip_classifier(model, backbone)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if w is not None:
        t = w.transforms()
        mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return Backbone(backbone, model, feature_dim, mean, std)


def _strip_classifier(model: nn.Module, backbone: str) -> int:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000:
            last = name
    if last is None:
        raise ConfigError(f"backbone {backbone} has no final Linear(…, 1000) classifier to replace; pick another")
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    feature_dim = getattr(parent, child).in_features
    setattr(parent, child, nn.Identity())
    if hasattr(model, "aux_logits"):  # googlenet/inception: training-time aux heads are not ours
        model.aux_logits = False
        for aux in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return feature_dim


class MultiHeadModel(nn.Module):
    """backbone(x) -> features (N, D); heads[name](features) -> logits (N, classes of that head).

    `preprocessing` is the input definition the model expects (size, mean/std); `class_names` the labels of
    each head's logits. Neither is in the state dict: a run directory stores them beside model.pt."""

    def __init__(self, backbone: Backbone, heads: dict[str, list[str]], image_size: int):
        super().__init__()
        self.backbone = backbone.module
        self.feature_dim = backbone.feature_dim
        self.preprocessing = backbone.preprocessing(image_size)
        self.class_names = {name: list(classes) for name, classes in heads.items()}
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(c)) for name, c in heads.items()})

    @property
    def head_names(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        return {name: head(feats) for name, head in self.heads.items()}


class ExportModule(nn.Module):
    """The graph that is exported: one input `images`, one logits output per head, in a fixed order."""

    def __init__(self, model: MultiHeadModel):
        super().__init__()
        self.model = model
        self.order = model.head_names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return tuple(out[name] for name in self.order)


def build_model(backbone: str, weights: str, heads: dict[str, list[str]], image_size: int) -> MultiHeadModel:
    """A backbone with fresh heads; `model.preprocessing` holds the mean/std of `weights` at `image_size`."""
    return MultiHeadModel(create_backbone(backbone, weights), heads, image_size)
