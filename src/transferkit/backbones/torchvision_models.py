"""torchvision classification models as backbones: the last `nn.Linear` with 1000 outputs (the ImageNet
classifier) is replaced by an identity and the features it took become the heads' input. Mean/std come from
the weights' own transforms, never re-typed."""

from __future__ import annotations

import urllib.error

from torch import nn

from transferkit.backbones.base import Backbone
from transferkit.backbones.weights_file import load_into, looks_like_path, read_state_dict
from transferkit.errors import ConfigError, TransferkitError
from transferkit.preprocess import IMAGENET_MEAN, IMAGENET_STD

# torchvision's default for some models (e.g. mobilenet_v2) is a V2 recipe; V1 is the classic transfer
# baseline and the one `make setup` installs offline, so `imagenet` means V1 where it exists.
_PREFERRED_IMAGENET = ("IMAGENET1K_V1", "DEFAULT")


def check(backbone: str, weights: str) -> None:
    if looks_like_path(weights):
        _check_name(backbone)
        return
    resolve_weights(backbone, weights)


def _check_name(backbone: str) -> None:
    import torchvision

    if backbone not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"unknown backbone {backbone!r}; use a torchvision classification model name, e.g. mobilenet_v2, "
            f"resnet18, efficientnet_b0, convnext_tiny, or timm/NAME for a timm model"
        )


def resolve_weights(backbone: str, weights: str):
    """`imagenet` | `none` | a torchvision weights enum name -> a weights enum member or None."""
    import torchvision

    _check_name(backbone)
    if weights == "none":
        return None
    enum = torchvision.models.get_model_weights(backbone)
    names = [w.name for w in enum] + ["DEFAULT"]
    wanted = _PREFERRED_IMAGENET if weights == "imagenet" else (weights,)
    for name in wanted:
        if name in names:
            return enum[name] if name != "DEFAULT" else enum.DEFAULT
    raise ConfigError(
        f"backbone {backbone} has no weights {weights!r}; use imagenet, none, a weights file, or one of {names}"
    )


def native_size(backbone: str, weights: str) -> int:
    w = None if looks_like_path(weights) else resolve_weights(backbone, weights)
    if w is None:
        return 224
    crop = getattr(w.transforms(), "crop_size", [224])
    return int(crop[0] if isinstance(crop, (list, tuple)) else crop)


def create(backbone: str, weights: str) -> Backbone:
    import torchvision

    if looks_like_path(weights):
        _check_name(backbone)
        model = torchvision.models.get_model(backbone, weights=None)
        state, sha = read_state_dict(weights)
        info = load_into(model, state, _classifier_keys(model, backbone), f"torchvision {backbone}")
        info.update(source="file", path=weights, sha256=sha)
        feature_dim = _strip_classifier(model, backbone)
        return Backbone(backbone, model, feature_dim, IMAGENET_MEAN, IMAGENET_STD, weights=info)
    w = resolve_weights(backbone, weights)
    try:
        model = torchvision.models.get_model(backbone, weights=w)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        if w is None:
            raise
        raise TransferkitError(
            f"could not load {backbone} weights {w.name}: not in torch's hub cache and the download failed "
            f"({type(exc).__name__}); connect once so torchvision can fetch {w.url.rsplit('/', 1)[-1]}, place that "
            f"file in $TORCH_HOME/hub/checkpoints (`make setup` does this for mobilenet_v2), pass the file itself "
            f"to --weights, or pass --weights none"
        ) from None
    feature_dim = _strip_classifier(model, backbone)
    mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
    if w is not None:
        t = w.transforms()
        mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        size = native_size(backbone, weights)
    info = {"source": "torchvision", "name": w.name, "url": w.url} if w is not None else {"source": "none"}
    return Backbone(backbone, model, feature_dim, mean, std, native_size=size, weights=info)


def _classifier(model: nn.Module, backbone: str) -> str:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == 1000:
            last = name
    if last is None:
        raise ConfigError(f"backbone {backbone} has no final Linear(…, 1000) classifier to replace; pick another")
    return last


def _classifier_keys(model: nn.Module, backbone: str) -> list[str]:
    prefix = _classifier(model, backbone)
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _strip_classifier(model: nn.Module, backbone: str) -> int:
    last = _classifier(model, backbone)
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
