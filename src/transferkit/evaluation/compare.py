"""`transferkit compare NEW OLD [--traffic DIR]`: may NEW replace OLD? Proven on labelled data, shown on traffic.

Labelled: both runs' PyTorch models on the same test images of every labelled dataset either run was trained
on (and any --data added, e.g. a labelled sample of the new domain), cell by cell (head, dataset) where both
heads can score the dataset. The images are paired, so the difference is judged by the discordant pairs
(images exactly one model gets right), with the export gate's statistic (evaluation/paired.py: the Agresti-Min
one-sided 95% bounds on the accuracy drop OLD - NEW). A cell is
- `ok` when NEW is shown to lose no more than --tolerance points (the drop's upper bound is within it: a
  non-inferiority test, so a small test split cannot pass by luck, and gaining accuracy never fails);
- `regression` when NEW is shown to lose more (the drop's lower bound is above the tolerance);
- `unproven` otherwise: too few images to tell; score more (--limit) or accept the risk knowingly.
The verdict is `promote` when every cell is ok, and the command's exit code is 3 otherwise (for CI).

Traffic (captured by `serve --capture`, unlabeled): both models on the captured images, per head both answer
for: how often they agree, their mean top-1 confidence, and the drift of each against its own reference (its
softmax outputs on its labelled test images; evaluation/drift.py's tests): how far the traffic still is from
what the model knows. Shown, not judged: without labels no traffic figure proves NEW better. A model adapted on
the same captured images is scored on images it trained on without labels (transductive, as test-time
adaptation is); a labelled sample of that domain given with --data is the honest measure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.data import DatasetSpec, load_dataset
from transferkit.data.base import limit_indices
from transferkit.data.captured import read_one_model
from transferkit.errors import ConfigError, DataError
from transferkit.evaluation.drift import REFERENCE_IMAGES, shift_tests, softmax
from transferkit.evaluation.matrix import head_targets
from transferkit.evaluation.paired import paired_drop, upper_bound
from transferkit.runs import load_run_model
from transferkit.traffic import image_rows, images_of
from transferkit.training.evaluate import predict_logits

TOLERANCE = 1.0  # points of accuracy NEW may lose on a labelled dataset (the export gate's default)


CONFIDENCE = 0.95  # one-sided, as the export gate's


@dataclass
class PairedCell:
    head: str
    dataset: str
    n: int
    old: float
    new: float
    only_new: int  # images NEW gets right and OLD wrong
    only_old: int
    drop_low: float  # one-sided 95% bounds of OLD - NEW accuracy, in points (evaluation/paired.py)
    drop_high: float
    verdict: str

    @property
    def delta(self) -> float:
        return 100.0 * (self.new - self.old)


def paired_cell(head: str, dataset: str, old_right: np.ndarray, new_right: np.ndarray, tolerance: float):
    """OLD is the reference and NEW the candidate, as PyTorch and an artifact are at the gate; the lower bound
    on the drop is the upper bound on the gain with the roles swapped."""
    drop = paired_drop(old_right, new_right, CONFIDENCE)
    low = -upper_bound(drop.gained, drop.lost, drop.images, CONFIDENCE)
    verdict = "ok" if drop.within(tolerance) else "regression" if low > tolerance else "unproven"
    return PairedCell(
        head,
        dataset,
        drop.images,
        float(old_right.mean()),
        float(new_right.mean()),
        drop.gained,
        drop.lost,
        low,
        float(drop.upper_points),
        verdict,
    )


class _Side:
    """One run's model, loaded once, with its data loaded at its own input definition."""

    def __init__(self, run_dir: str | Path, device: str):
        self.model, self.run = load_run_model(run_dir)
        self.model.to(device, memory_format=torch.channels_last)
        self.device = device
        self.loaded: dict[str, Any] = {}

    def dataset(self, spec: DatasetSpec, limit: int | None):
        if spec not in self.loaded:
            self.loaded[spec] = load_dataset(spec, self.run.preprocessing, limit)
        return self.loaded[spec]

    def logits(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return predict_logits(self.model, images, self.run.preprocessing, self.device)

    def reference(self, limit: int | None) -> dict[str, np.ndarray]:
        """Per head, softmax outputs on the run's own labelled test images (the drift reference)."""
        parts: dict[str, list[np.ndarray]] = {}
        for text in self.run.config.data:
            images = self.dataset(DatasetSpec.parse(text, with_head=False), limit).test.images
            for head, logits in self.logits(images[:REFERENCE_IMAGES]).items():
                parts.setdefault(head, []).append(softmax(logits))
        return {head: np.concatenate(p) for head, p in parts.items()}


def labelled_cells(new: _Side, old: _Side, extra: list[str], split: str, limit, tolerance) -> list[PairedCell]:
    texts = list(dict.fromkeys([*old.run.config.data, *new.run.config.data, *extra]))
    cells = []
    for text in texts:
        spec = DatasetSpec.parse(text, with_head=False)
        if spec.traffic is not None:
            raise ConfigError(f"--data {text}: captured traffic has no labels; pass it with --traffic")
        old_ds, new_ds = old.dataset(spec, limit), new.dataset(spec, limit)
        old_part, new_part = old_ds.split(split), new_ds.split(split)
        old_logits, new_logits = old.logits(old_part.images), new.logits(new_part.images)
        old_targets = head_targets(old.run, old_ds, old_part.labels)
        for head, new_target in head_targets(new.run, new_ds, new_part.labels).items():
            if head not in old_targets:
                continue
            keep = (new_target >= 0) & (old_targets[head] >= 0)
            if not keep.any():
                continue
            new_right = new_logits[head][keep].argmax(1) == new_target[keep]
            old_right = old_logits[head][keep].argmax(1) == old_targets[head][keep]
            cells.append(paired_cell(head, new_ds.name, old_right, new_right, tolerance))
    if not cells:
        raise ConfigError("the two runs share no head that can score a common dataset; are they the same task?")
    return cells


def traffic_rows(new: _Side, old: _Side, traffic: str, limit: int | None) -> list[dict[str, Any]]:
    table = read_one_model(traffic)  # read once; each side sees the images at its own input size
    rows = image_rows(table)
    if len(rows) == 0:
        raise DataError(f"--traffic {traffic}: no captured row holds an image (only tensor requests were captured)")
    rows = rows[limit_indices(len(rows), limit)]
    new_logits = new.logits(images_of(table, rows, new.run.preprocessing))
    old_logits = old.logits(images_of(table, rows, old.run.preprocessing))
    new_ref, old_ref = new.reference(limit), old.reference(limit)
    rows = []
    for head in [h for h in new_logits if h in old_logits]:
        new_p, old_p = softmax(new_logits[head]), softmax(old_logits[head])
        rows.append(
            {
                "head": head,
                "rows": len(new_p),
                "agreement": float((new_p.argmax(1) == old_p.argmax(1)).mean()),
                "old_confidence": float(old_p.max(1).mean()),
                "new_confidence": float(new_p.max(1).mean()),
                "old_drift_p": shift_tests(old_ref[head], old_p).p if head in old_ref else None,
                "new_drift_p": shift_tests(new_ref[head], new_p).p if head in new_ref else None,
            }
        )
    return rows


def compare_runs(
    new_dir: str | Path,
    old_dir: str | Path,
    traffic: str | None = None,
    extra: list[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    if not tolerance >= 0:
        raise ConfigError(f"--tolerance must be >= 0 points, got {tolerance}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    new, old = _Side(new_dir, device), _Side(old_dir, device)
    cells = labelled_cells(new, old, extra or [], split, limit, tolerance)
    return {
        "new": str(Path(new_dir).resolve()),
        "old": str(Path(old_dir).resolve()),
        "split": split,
        "tolerance": tolerance,
        "labelled": [asdict(c) | {"delta": c.delta} for c in cells],
        "traffic": None
        if traffic is None
        else {"dir": str(Path(traffic).resolve()), "heads": traffic_rows(new, old, traffic, limit)},
        "verdict": "promote" if all(c.verdict == "ok" for c in cells) else "refuse",
    }


def format_compare(report: dict[str, Any]) -> str:
    lines = [
        f"labelled ({report['split']} split; NEW must not lose more than {report['tolerance']:g} points, "
        "shown at 95% one-sided)",
        f"{'head':<16} {'dataset':<20} {'images':>7} {'old':>7} {'new':>7} {'new-old':>8} {'drop, 95% bounds':>17}"
        "  verdict",
    ]
    for c in report["labelled"]:
        bounds = f"{c['drop_low']:+.2f}..{c['drop_high']:+.2f}"
        lines.append(
            f"{c['head']:<16} {c['dataset']:<20} {c['n']:>7} {c['old']:>7.2%} {c['new']:>7.2%} {c['delta']:>+8.2f} "
            f"{bounds:>17}  {c['verdict']}"
        )
    if report["traffic"]:
        lines += ["", f"traffic {report['traffic']['dir']} (unlabeled; shown, not judged)"]
        lines.append(
            f"{'head':<16} {'rows':>7} {'agree':>7} {'old conf':>9} {'new conf':>9} {'old drift p':>12} {'new drift p':>12}"
        )
        for t in report["traffic"]["heads"]:
            drift = [f"{v:>12.2g}" if v is not None else f"{'-':>12}" for v in (t["old_drift_p"], t["new_drift_p"])]
            lines.append(
                f"{t['head']:<16} {t['rows']:>7} {t['agreement']:>7.1%} {t['old_confidence']:>9.3f} "
                f"{t['new_confidence']:>9.3f} {drift[0]} {drift[1]}"
            )
    lines.append(f"verdict: {report['verdict'].upper()} (NEW {report['new']} over OLD {report['old']})")
    return "\n".join(lines)


def write_compare(report: dict[str, Any], out: Path) -> Path:
    """compare.json and compare.md in `out`, written atomically."""
    from transferkit.utils import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", report)
    atomic_write_text(out / "compare.md", "# Compare\n\n```\n" + format_compare(report) + "\n```\n")
    return out


__all__ = ["TOLERANCE", "PairedCell", "compare_runs", "format_compare", "paired_cell", "write_compare"]
