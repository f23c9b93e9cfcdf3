"""Per-epoch metrics: RUN/metrics.json (history + best), RUN/metrics.csv, optional TensorBoard events;
and the step progress shown while an epoch runs (`progress_bar`)."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import IO

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
    def __init__(self, run_dir: Path, tensorboard: bool = False, tracker=None):
        self.run_dir = run_dir
        self.tracker = tracker  # transferkit.tracking: epochs and steps also go there (None: nowhere else)
        self.history: list[dict] = []
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from transferkit.errors import ConfigError

                raise ConfigError(
                    "--tensorboard needs the tensorboard package: pip install 'transferkit[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def add(self, record: dict) -> None:
        self.history.append(record)
        best = max(self.history, key=lambda r: r["val_acc_mean"])
        atomic_write_json(
            self.run_dir / "metrics.json", {"best_epoch": best["epoch"], "best": best, "history": self.history}
        )
        rows = [flatten(r) for r in self.history]
        fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", buf.getvalue())
        if self.tracker is not None:
            numbers = {k: v for k, v in flatten(record).items() if _is_number(v) and k != "epoch"}
            self.tracker.log_metrics({f"epoch/{k}": v for k, v in numbers.items()}, step=record["epoch"])
        if self.writer is not None:
            for key, value in flatten(record).items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def steps(self, values: list[tuple[int, dict]]) -> None:
        """Per-step values [(global step, {name: number or 0-d tensor})], read here: the trainer hands them over
        where it synchronises with the device anyway, so tracking every step costs no extra sync."""
        if self.tracker is None:
            return
        for step, named in values:
            self.tracker.log_metrics({f"step/{k}": float(v) for k, v in named.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Without a terminal, how often a running epoch reports its progress (the trainer prints each epoch's end).
PROGRESS_LINE_SECONDS = 30.0


def progress_bar(
    total: int,
    initial: int = 0,
    desc: str = "",
    disable: bool = False,
    file: IO[str] | None = None,
    interval: float = PROGRESS_LINE_SECONDS,
    **tqdm_options,
):
    """A tqdm bar on a terminal; elsewhere (CI, nohup, `docker logs`) a plain line every `interval` seconds,
    because there every carriage-return redraw of a bar is kept as text: thousands of lines per epoch."""
    file = file if file is not None else sys.stderr
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=disable, file=file, **tqdm_options)
    return LineProgress(total, initial, desc, disable, file, interval)


class LineProgress:
    """The part of tqdm's interface the trainer uses (update, set_postfix, close), writing whole lines."""

    def __init__(self, total: int, initial: int, desc: str, disable: bool, file: IO[str], interval: float):
        self.total, self.n, self.desc = total, initial, desc
        self.disable, self.file, self.interval = disable, file, interval
        self.postfix = ""
        self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self._last >= self.interval:
            self._last = now
            share = f" ({self.n / self.total:.0%})" if self.total else ""
            postfix = f"  {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: step {self.n}/{self.total}{share}{postfix}", file=self.file, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        """Nothing to clear: no partial line was written."""
