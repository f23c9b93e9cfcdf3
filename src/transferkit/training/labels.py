"""Label spaces: which datasets share a head, and how class names of one run map onto another.

Knowledge transfer happens through names. Two datasets whose (normalised) class names are the same set
train one head (`heads: shared`); `--init RUN` reuses every head row whose class name exists in the new
label space; evaluation scores a head on any dataset whose classes map into it. Names are compared after
normalisation (case, surrounding whitespace, `_`/`-`/space runs), and an optional label map turns synonyms
into one canonical name first (`{"sneaker": "shoe", "ankle boot": "boot"}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from transferkit.errors import ConfigError
from transferkit.model import head_name
from transferkit.runs import Labels


def normalize_class_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name).strip().lower())


class LabelMap:
    """Synonyms -> canonical names, then normalisation. An empty map is plain normalisation."""

    def __init__(self, synonyms: dict[str, str] | None = None):
        self.synonyms = {normalize_class_name(k): normalize_class_name(v) for k, v in (synonyms or {}).items()}

    @classmethod
    def from_file(cls, path: str | Path | None) -> LabelMap:
        if path is None:
            return cls()
        text = Path(path).read_text()
        try:
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"label map {path}: cannot parse ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(v, (str, int)) for v in data.values()):
            raise ConfigError(f"label map {path}: expected a mapping {{synonym: class name}}")
        return cls({str(k): str(v) for k, v in data.items()})

    def canonical(self, name: str) -> str:
        n = normalize_class_name(name)
        return self.synonyms.get(n, n)


@dataclass
class HeadPlan:
    labels: Labels  # heads -> class names, datasets -> head
    label_remap: dict[str, list[int]]  # dataset -> for each of its class indices, the index in its head


def plan_heads(datasets: list[tuple[str, list[str]]], mode: str, label_map: LabelMap) -> HeadPlan:
    """Decide the heads: with mode `shared`, datasets whose canonical class-name sets are equal share a head
    (named after the first such dataset, keeping its class order); otherwise one head per dataset."""
    heads: dict[str, list[str]] = {}
    head_keys: dict[str, frozenset] = {}
    assignment: dict[str, str] = {}
    remap: dict[str, list[int]] = {}
    for name, classes in datasets:
        canon = [label_map.canonical(c) for c in classes]
        if len(set(canon)) != len(canon):
            raise ConfigError(f"{name}: class names collide after normalisation/label map: {classes}")
        key = frozenset(canon)
        target = next((h for h, k in head_keys.items() if k == key), None) if mode == "shared" else None
        if target is None:
            target = head_name(name)
            if target in heads:
                raise ConfigError(f"two datasets give the same head name {target!r}; rename one folder")
            heads[target], head_keys[target] = list(classes), key
        head_canon = [label_map.canonical(c) for c in heads[target]]
        assignment[name] = target
        remap[name] = [head_canon.index(c) for c in canon]
    return HeadPlan(Labels(heads=heads, datasets=assignment), remap)


def class_index_map(source: list[str], target: list[str], label_map: LabelMap) -> dict[int, int]:
    """{index in source classes: index in target classes} for every name the two share."""
    target_index = {label_map.canonical(c): i for i, c in enumerate(target)}
    return {
        i: target_index[label_map.canonical(c)] for i, c in enumerate(source) if label_map.canonical(c) in target_index
    }


def match_head(classes: list[str], heads: dict[str, list[str]], label_map: LabelMap) -> str | None:
    """The head whose class names cover the most of `classes` (None if none shares a name)."""
    best, best_overlap = None, 0
    for head, head_classes in heads.items():
        overlap = len(class_index_map(classes, head_classes, label_map))
        if overlap > best_overlap:
            best, best_overlap = head, overlap
    return best
