"""Per-epoch metrics: RUN/metrics.json (history + best), RUN/metrics.csv, optional TensorBoard events."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from transferkit.utils import atomic_write_json, atomic_write_text


def flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in record.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}/"))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.run_dir = run_dir
        self.history: list[dict] = []
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from transferkit.errors import ConfigError

                raise ConfigError("--tensorboard needs the tensorboard package: pip install 'transferkit[tensorboard]'") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, record: dict) -> None:
        self.history.append(record)
        best = max(self.history, key=lambda r: r["val_acc_mean"])
        atomic_write_json(self.run_dir / "metrics.json", {"best_epoch": best["epoch"], "best": best, "history": self.history})
        rows = [flatten(r) for r in self.history]
        fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        if self.writer is not None:
            for key, value in flatten(record).items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
