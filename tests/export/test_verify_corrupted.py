"""The gate's corrupted sample (export/verify_corrupted.py): recorded for every artifact in verify.json and the
export table, and, with --robust-tolerance, failing an artifact that loses accuracy on corrupted images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferkit.errors import ConfigError
from transferkit.export.job import ExportOptions
from transferkit.export.table import format_export_table
from transferkit.export.verify_corrupted import CORRUPTIONS, SEVERITIES, CorruptedSample


def test_the_gate_records_each_artifact_on_corrupted_images(exported):
    run_dir, result = exported
    verify = json.loads((run_dir / "export" / "verify.json").read_text())
    sample = verify["robustness_sample"]
    assert sample["corruptions"] == list(CORRUPTIONS) and sample["severities"] == list(SEVERITIES)
    assert sample["images_per_dataset"] == {"digits": 32, "fashion-mnist": 32}
    robustness = verify["formats"]["onnx"]["robustness"]
    assert robustness["passed"] and robustness["tolerance_points"] is None
    for head in ("digits", "fashion-mnist"):
        stats = robustness["heads"][head]
        assert stats["images"] == 32 * len(CORRUPTIONS) * len(SEVERITIES)
        assert stats["top1_agreement"] > 0.95  # fp32 ONNX follows PyTorch on corrupted images too
        assert set(stats["per_corruption"]) == {f"{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES}
    header = format_export_table(result).splitlines()[0]
    assert "corr. agree" in header and "corr. Δacc" in header


class _Runtime:
    """A stand-in runtime that answers with given logits."""

    def __init__(self, logits: dict[str, np.ndarray]) -> None:
        self.heads, self.logits, self.seen = list(logits), logits, 0

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        rows = slice(self.seen, self.seen + len(batch))
        self.seen += len(batch)
        return {h: v[rows] for h, v in self.logits.items()}


def _sample(n: int = 60) -> CorruptedSample:
    labels = np.arange(n) % 3
    reference = np.eye(3, dtype=np.float32)[labels] * 5  # PyTorch is right on every image
    return CorruptedSample(
        np.zeros((n, 3, 8, 8), np.float32),
        {"h": np.arange(n)},
        {"h": labels},
        ["gaussian_noise/2", "jpeg_compression/4"],
        np.repeat([0, 1], n // 2),
        {"d": n // 2},
        {"h": reference},
    )


def test_robust_tolerance_fails_an_artifact_that_loses_points_on_corrupted_images():
    sample = _sample()
    worse = sample.reference["h"].copy()
    worse[:6] = np.roll(worse[:6], 1, axis=1)  # wrong on 6 of 60: 10 points below PyTorch, all in one block
    report = {"passed": True, "failures": []}
    sample.check(report, _Runtime({"h": worse}), tolerance_points=5.0)
    assert not report["passed"] and "beyond --robust-tolerance 5" in report["failures"][0]
    stats = report["robustness"]["heads"]["h"]
    assert stats["accuracy_delta_points"] == pytest.approx(-10.0) and stats["top1_agreement"] == pytest.approx(0.9)
    assert stats["per_corruption"]["gaussian_noise/2"]["accuracy_delta_points"] == pytest.approx(-20.0)
    assert stats["per_corruption"]["jpeg_compression/4"]["accuracy_delta_points"] == 0.0
    recorded_only = {"passed": True, "failures": []}
    sample.check(recorded_only, _Runtime({"h": worse}), tolerance_points=None)  # the default: recorded, not judged
    assert recorded_only["passed"] and recorded_only["robustness"]["heads"]["h"]["accuracy_delta_points"] < 0
    assert sample.compare({"h": worse}, tolerance_points=15.0)["passed"]


def test_robust_tolerance_is_an_export_option_refused_when_negative():
    from transferkit.cli import build_parser
    from transferkit.options import given

    args = build_parser().parse_args(["export", "RUN", "--robust-tolerance", "2.5"])
    assert ExportOptions(**given(args, ExportOptions)).robust_tolerance == 2.5
    with pytest.raises(ConfigError, match="--robust-tolerance must be >= 0 points"):
        ExportOptions(robust_tolerance=-1.0)
