"""timm classification models as backbones (`--backbone timm/NAME`), with the input definition of their weights.

timm's `pretrained_cfg` is the input definition we want to keep, and we keep it: mean, std and interpolation go
into the run's one `Preprocessing`, and `--image-size auto` takes its input size. The classifier is removed with
timm's own `reset_classifier(0)`, so the network returns its pooled (pre-logits) features. ImageNet weights come
from Hugging Face's hub cache, as timm loads them (`HF_HUB_OFFLINE=1` keeps it to the cache); a local file goes
through weights_file.py like any other.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from transferkit.backbones.base import TIMM_PREFIX, Backbone
from transferkit.backbones.weights_file import load_into, looks_like_path, read_state_dict, sha256_of
from transferkit.errors import ConfigError, TransferkitError

_RESIZE = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "lanczos": "lanczos"}


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm backbones need timm: pip install 'transferkit[timm]' (or pip install timm)") from None
    return timm


def _split(backbone: str) -> str:
    name = backbone[len(TIMM_PREFIX) :]
    timm = _timm()
    if not name or not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:8] if name else []
        raise ConfigError(
            f"unknown timm model {name!r}; use timm/NAME with a name from timm.list_models()"
            + (f", e.g. {', '.join(close)}" if close else ", e.g. timm/mobilenetv2_100, timm/resnet18")
        )
    return name


def _pretrained_name(name: str, weights: str) -> str | None:
    """timm's `name.tag` for hub weights, None for none or a file."""
    if weights == "none" or looks_like_path(weights):
        return None
    if weights.startswith("hf-hub:"):
        return weights
    timm = _timm()
    full = name if weights == "imagenet" else f"{name}.{weights}"
    if not timm.list_pretrained(full if "." in full else f"{full}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
        raise ConfigError(
            f"timm model {name} has no pretrained weights {weights!r}; use imagenet, none, a weights file, "
            f"or one of its tags {tags}"
        )
    return full


def check(backbone: str, weights: str) -> None:
    _pretrained_name(_split(backbone), weights)


def _cfg(name: str, weights: str) -> dict[str, Any]:
    timm = _timm()
    full = _pretrained_name(name, weights)
    if full is not None and not full.startswith("hf-hub:"):
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    else:
        cfg = timm.models.get_pretrained_cfg(name)  # a file or none: the default tag's input definition
    return cfg.to_dict() if cfg is not None else {}


def native_size(backbone: str, weights: str) -> int:
    size = _cfg(_split(backbone), weights).get("input_size", (3, 224, 224))
    return int(size[-1])


def create(backbone: str, weights: str) -> Backbone:
    timm = _timm()
    name = _split(backbone)
    full = _pretrained_name(name, weights)
    if full is None:
        model = timm.create_model(name, pretrained=False)
        info: dict[str, Any] = {"source": "none"}
        if looks_like_path(weights):
            state, sha = read_state_dict(weights)
            info = load_into(model, state, _classifier_keys(model), f"timm {name}")
            info.update(source="file", path=weights, sha256=sha)
    else:
        model = _from_hub(timm, full, weights)
        info = {"source": "timm", "name": full, **_cached_file(model)}
    cfg = {**_cfg(name, weights), **(model.pretrained_cfg or {})} if full else _cfg(name, weights)
    model.reset_classifier(0)
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return Backbone(
        backbone,
        model,
        feature_dim,
        tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        resize=_RESIZE.get(str(cfg.get("interpolation", "bilinear")), "bilinear"),
        native_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        weights=info,
    )


def _from_hub(timm, full: str, weights: str) -> nn.Module:
    try:
        return timm.create_model(full, pretrained=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise TransferkitError(
            f"could not load timm weights {full} ({type(exc).__name__}): they are not in Hugging Face's hub cache "
            f"($HF_HOME/hub) and the download failed; connect once so timm can fetch them, set HF_HUB_OFFLINE=1 "
            f"to use only the cache without waiting on the network, pass a weights file to --weights, "
            f"or pass --weights none"
        ) from None


def _cached_file(model: nn.Module) -> dict[str, str]:
    """The hub file timm read, and its sha256, when it is in the hub cache (not for `url` downloads)."""
    repo = (model.pretrained_cfg or {}).get("hf_hub_id")
    if not repo:
        return {}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {}
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return {"path": path, "sha256": sha256_of(path)}  # type: ignore[arg-type]
    return {}


def _classifier_keys(model: nn.Module) -> list[str]:
    names = model.pretrained_cfg.get("classifier", "classifier")
    prefixes = (names,) if isinstance(names, str) else tuple(names)
    return [k for k in model.state_dict() if k.startswith(tuple(f"{p}." for p in prefixes))]
