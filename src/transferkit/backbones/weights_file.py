"""Pretrained weights from a local file: a state dict or a training checkpoint, mapped into a backbone.

Users keep weights as torch pickles (`.pth`, `.pt`, `.bin`) or `.safetensors`, saved bare or inside a
checkpoint (`{"state_dict": ...}`, `{"model": ...}`, DDP's `module.` prefix). The file is read without running
code (`torch.load(weights_only=True)`, safetensors), hashed, and mapped into the network built for `--backbone`:

1. by name, when every parameter and buffer of the network outside its classifier is in the file with the
   same shape (a classifier of another size is left out: the heads replace it anyway);
2. by position, when the names differ but the tensors are the same in number, order and shape: the same
   architecture written by another codebase (torchvision's MobileNetV2 file into timm's `mobilenetv2_100`, the
   EfficientNet-Lite0 release into timm's `tf_efficientnet_lite0`). With a file that also lacks the classifier,
   all of the backbone's tensors must match in order.

Anything else is refused, naming the first missing and unexpected keys, before any data is loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferkit.errors import ConfigError

SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# checkpoint layouts, in the order they are tried: timm's train.py, Lightning and most trainers; ours; others
_WRAPPERS = ("state_dict", "model", "model_state", "model_state_dict", "net")
_SHOWN = 5  # keys named in an error


def looks_like_path(weights: str) -> bool:
    return not weights.startswith("hf-hub:") and (
        weights.endswith(SUFFIXES) or "/" in weights or Path(weights).expanduser().exists()
    )


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """-> (the tensors, the file's sha256). No code in the file runs."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file {p} not found; pass an existing file, imagenet or none to --weights")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(p))
        else:
            raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix, with the reason
        raise ConfigError(
            f"cannot read weights file {p} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it must be a "
            f"state dict or a checkpoint holding one, saved with torch.save ({', '.join(SUFFIXES[:-1])}) or as "
            f".safetensors, with tensors only"
        ) from None
    state = _unwrap(raw, p)
    return state, sha256_of(p)


def _unwrap(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPERS:
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ConfigError(
            f"weights file {path} holds no state dict (a mapping of names to tensors, bare or under one of "
            f"{list(_WRAPPERS)})"
        )
    if all(k.startswith("module.") for k in raw):  # saved from DistributedDataParallel
        raw = {k[len("module.") :]: v for k, v in raw.items()}
    return raw


def load_into(model: nn.Module, state: dict[str, torch.Tensor], classifier: list[str], what: str) -> dict:
    """Copy `state` into `model` (the full network, classifier included). `classifier`: the model's keys that
    the heads replace (they may be absent or of another size). -> how the file matched."""
    target = model.state_dict()
    wanted = [k for k in target if k not in classifier]
    if all(k in state and state[k].shape == target[k].shape for k in wanted):
        model.load_state_dict({k: state[k] for k in wanted}, strict=False)
        return {"matched": "by name", "tensors": len(wanted)}
    mapping = _by_position(list(target.items()), list(state.items()), len(wanted))
    if mapping is not None:
        model.load_state_dict({t: state[s] for t, s in mapping}, strict=False)
        return {"matched": "by position", "tensors": len(mapping), "first": [mapping[0][1], mapping[0][0]]}
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != target[k].shape
    ]
    parts = [f"{len(state)} tensors in the file, {len(target)} in {what}"]
    if missing:
        parts.append(f"missing {len(missing)}: {', '.join(missing[:_SHOWN])}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:_SHOWN])}")
    if shapes:
        parts.append(f"other shapes {len(shapes)}: {'; '.join(shapes[:_SHOWN])}")
    raise ConfigError(
        f"the weights file does not fit {what} ({'; '.join(parts)}); pass weights saved from this architecture, "
        f"or the --backbone they were saved from"
    )


def _by_position(target: list, source: list, backbone_count: int) -> list[tuple[str, str]] | None:
    """[(target key, source key)] when the tensors line up in order and shape: all of them, or the backbone's
    (the first `backbone_count`, a file saved without its classifier). None when they do not."""
    for count in (len(target), backbone_count):
        if len(source) == count and all(
            tuple(t.shape) == tuple(s.shape) for (_, t), (_, s) in zip(target[:count], source, strict=True)
        ):
            return [(t, s) for (t, _), (s, _) in zip(target[:count], source, strict=True)]
    return None


def describe(info: dict) -> list[str]:
    """What the log says about the weights: a file's path, hash and how it matched; nothing for the defaults."""
    if info.get("source") != "file":
        return []
    return [
        f"weights {info['path']} (sha256 {info['sha256'][:16]}...): {info['tensors']} tensors matched {info['matched']}"
    ]
