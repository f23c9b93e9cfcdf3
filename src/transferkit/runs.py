"""The run directory: what training writes and what eval, export and serving read.

RUN/
  config.yaml          resolved TrainConfig (every default spelled out)
  preprocessing.json   the model's input definition (transferkit.preprocess.Preprocessing)
  labels.json          {"heads": {head: [class names]}, "datasets": {dataset: head}, "specs": {dataset: spec}}
  model.pt             state dict of MultiHeadModel (EMA weights when EMA is on); loads with weights_only=True
  metrics.json         per-epoch history and the best epoch
  checkpoint.pt        full training state for --resume (optimizer, scheduler, RNG, sampler position)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from transferkit.config import TrainConfig, config_from_dict
from transferkit.errors import TransferkitError
from transferkit.preprocess import Preprocessing
from transferkit.utils import atomic_write_json, read_json


@dataclass
class Labels:
    heads: dict[str, list[str]]  # head name -> class names, in logit order
    datasets: dict[str, str]  # dataset name -> the head trained on it
    # dataset name -> its DatasetSpec text (e.g. imagefolder:/abs/path): export verification reloads the images
    # a head was trained on without guessing which config.data entry held them; empty in older runs
    specs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"heads": self.heads, "datasets": self.datasets, "specs": self.specs}

    @classmethod
    def from_dict(cls, d: dict) -> Labels:
        return cls(
            heads={k: list(v) for k, v in d["heads"].items()},
            datasets=dict(d.get("datasets", {})),
            specs=dict(d.get("specs", {})),
        )


@dataclass
class Run:
    dir: Path
    config: TrainConfig
    preprocessing: Preprocessing
    labels: Labels

    @property
    def model_path(self) -> Path:
        return self.dir / "model.pt"

    @property
    def export_dir(self) -> Path:
        return self.dir / "export"


def save_run_metadata(run_dir: Path, config: TrainConfig, pre: Preprocessing, labels: Labels) -> None:
    config.save(run_dir / "config.yaml")
    atomic_write_json(run_dir / "preprocessing.json", pre.to_dict())
    atomic_write_json(run_dir / "labels.json", labels.to_dict())


def load_run(run_dir: str | Path) -> Run:
    d = Path(run_dir)
    if not d.is_dir():
        raise TransferkitError(f"{d}: no such folder; pass the run folder `transferkit train` printed")
    missing = [n for n in ("config.yaml", "preprocessing.json", "labels.json") if not (d / n).is_file()]
    if missing:
        raise TransferkitError(
            f"{d} is not a transferkit run directory (missing {missing}); "
            f"pass the folder printed by `transferkit train`"
        )
    values = yaml.safe_load((d / "config.yaml").read_text())
    if isinstance(values, dict):  # a run written before precise BatchNorm trained without it: resumed, it goes on so
        values.setdefault("precise_bn", 0)
    config = config_from_dict(values, source=str(d / "config.yaml"))
    return Run(
        dir=d,
        config=config,
        preprocessing=Preprocessing.from_dict(read_json(d / "preprocessing.json")),
        labels=Labels.from_dict(read_json(d / "labels.json")),
    )


def load_run_model(run_dir: str | Path, map_location: str = "cpu"):
    """-> (MultiHeadModel in eval mode with the run's weights, Run). No network access: weights come from model.pt."""
    from transferkit.model import build_model

    run = load_run(run_dir)
    if not run.model_path.is_file():
        raise TransferkitError(f"{run.model_path} not found; the run has not finished an epoch yet (use --resume)")
    model = build_model(run.config.backbone, "none", run.labels.heads, run.preprocessing.image_size)
    model.preprocessing = run.preprocessing  # the trained weights' statistics, not those of the bare backbone
    state = torch.load(run.model_path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, run
