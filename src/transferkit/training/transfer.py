"""Sequential transfer (`--init RUN`): reuse an earlier run's backbone and the head rows of every class name
the new label space shares with it. Rows of new class names keep their fresh initialisation."""

from __future__ import annotations

import torch

from transferkit.errors import ConfigError
from transferkit.model import MultiHeadModel
from transferkit.runs import load_run
from transferkit.training.labels import LabelMap, class_index_map, match_head


@torch.no_grad()
def init_from_run(model: MultiHeadModel, init_dir: str, label_map: LabelMap) -> dict:
    """Copy weights from `init_dir` into `model` -> the mapping used, for printing and run metadata."""
    source = load_run(init_dir)
    if not source.model_path.is_file():
        raise ConfigError(f"--init {init_dir}: it has no model.pt yet; finish or resume that run first")
    state = torch.load(source.model_path, map_location="cpu", weights_only=True)
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        model.backbone.load_state_dict(backbone)
    except RuntimeError as exc:
        raise ConfigError(
            f"--init {init_dir}: its backbone ({source.config.backbone}) does not fit this one; "
            f"use --backbone {source.config.backbone} ({str(exc).splitlines()[0]})"
        ) from None
    mapping: dict = {"source_run": str(source.dir), "backbone": source.config.backbone, "heads": {}}
    for name, head in model.heads.items():
        new_classes = model.class_names[name]
        src_head = match_head(new_classes, source.labels.heads, label_map)
        if src_head is None:
            mapping["heads"][name] = {"from": None, "reused": [], "new": new_classes}
            continue
        src_classes = source.labels.heads[src_head]
        pairs = class_index_map(new_classes, src_classes, label_map)  # new index -> source index
        w, b = state[f"heads.{src_head}.weight"], state[f"heads.{src_head}.bias"]
        for new_i, src_i in pairs.items():
            head.weight[new_i] = w[src_i]
            head.bias[new_i] = b[src_i]
        mapping["heads"][name] = {
            "from": src_head,
            "reused": [new_classes[i] for i in sorted(pairs)],
            "new": [c for i, c in enumerate(new_classes) if i not in pairs],
        }
    return mapping


def describe_mapping(mapping: dict) -> list[str]:
    lines = [f"init: backbone from {mapping['source_run']} ({mapping['backbone']})"]
    for head, m in mapping["heads"].items():
        if m["from"] is None:
            lines.append(f"init: head {head}: no shared class names, all {len(m['new'])} rows new")
        else:
            lines.append(
                f"init: head {head} <- {m['from']}: {len(m['reused'])} rows reused"
                + (
                    f", {len(m['new'])} new ({', '.join(m['new'][:5])}{'…' if len(m['new']) > 5 else ''})"
                    if m["new"]
                    else ""
                )
            )
    return lines
