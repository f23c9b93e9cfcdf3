"""What one export shares between its exporters: the user's options, the job (model, folder, calibration and
selection data), and what an exporter reports back. Imports no exporter, so every exporter can import it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from transferkit.artifact import FormatSpec, Tolerance, artifact_files, artifact_name
from transferkit.errors import ConfigError
from transferkit.options import cli

if TYPE_CHECKING:  # torch is imported by the exporters when they run: `import transferkit.export` stays cheap
    import torch

    from transferkit.export.verify import VerifyInputs

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # onnxruntime's; NNCF attempts have their own estimators
FALLBACKS = ("auto", "off")
QAT_MODES = ("auto", "always", "off")
SLOWER_INT8 = ("withhold", "offer")  # an INT8 artifact measured slower than its fp32: not offered, or offered


@dataclass
class SelectionSet:
    """The validation split of every dataset with the PyTorch fp32 logits on it, and the gate's tolerance.

    INT8 attempts are judged here with the gate's own statistic and tolerance (the accuracy drop's upper
    confidence bound per dataset, evaluation/paired.py) and the fastest that passes is kept; the chosen artifact is
    then gated once on the test split (export/verify.py), so the gate is never the data the choice was tuned on.
    A pass here is *clear* when it also holds at `paired.clear_confidence` (99.8% for the gate's 95%): it will
    likely pass the gate too, where a bare pass does so about half the time. The search escalates past a bare
    pass to quantization-aware training, and prefers a clear pass (export/int8.py).
    """

    inputs: VerifyInputs
    reference: dict[str, np.ndarray]  # head -> PyTorch logits on inputs.batch
    tolerance: Tolerance  # the gate's

    def report(self, logits: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, Any]:
        """verify.compare on this split (or on `rows` of it) against the gate's tolerance."""
        from transferkit.export import verify

        inputs, reference = self.inputs, self.reference
        if rows is not None:
            inputs, reference, logits = verify.subset(inputs, reference, logits, rows)
        return verify.compare(reference, logits, inputs, "int8", self.tolerance)

    def clear(self, logits: dict[str, np.ndarray]) -> bool:
        """Passes at the clear confidence too (see the class docstring)."""
        from transferkit.evaluation.paired import clear_confidence
        from transferkit.export import verify

        if self.tolerance.confidence is None:
            return self.report(logits)["passed"]
        strict = replace(self.tolerance, confidence=clear_confidence(self.tolerance.confidence))
        return verify.compare(self.reference, logits, self.inputs, "int8", strict)["passed"]

    def violation(self, logits: dict[str, np.ndarray], rows: np.ndarray | None = None) -> float:
        """How far from the bounds: the largest, over datasets, of the drop's bound over the tolerance (and, where
        agreement is checked, of disagreement over its bound). <= 1 passes; smaller is better."""
        return violation_of(self.report(logits, rows))

    def unreachable(self) -> str | None:
        """Why nothing can pass the gate, if so: a dataset whose split is too small for the gate's bound even with
        no disagreement (the test split is as large as this one, or smaller, for the built-in datasets)."""
        from transferkit.evaluation.paired import best_provable_drop

        tol = self.tolerance
        if tol.confidence is None:
            return None
        for datasets in self.inputs.datasets.values():
            for dataset, n in datasets.items():
                best = best_provable_drop(n, tol.confidence)
                if best > tol.max_acc_delta_points:
                    return (
                        f"the validation split of {dataset} has {n} images: even with no disagreement its "
                        f"{tol.confidence:.0%} bound is {best:.2f} > {tol.max_acc_delta_points:g} points"
                    )
        return None


def violation_of(report: dict[str, Any]) -> float:
    """SelectionSet.violation of a report already made (its tolerance is in it)."""
    tol = report["tolerance"]
    worst = 0.0
    for head in report["heads"].values():
        if tol["min_top1_agreement"] is not None:
            worst = max(worst, (1 - head["top1_agreement"]) / max(1e-9, 1 - tol["min_top1_agreement"]))
        for ds in head["per_dataset"].values():
            drop = ds["drop_points"] if ds["drop_upper_points"] is None else ds["drop_upper_points"]
            worst = max(worst, drop / max(1e-9, tol["max_acc_delta_points"]))
    return worst


@dataclass
class ExportOptions:
    """Per-export choices beyond format and precision (CLI: `transferkit export --help`)."""

    simplify: bool = field(default=False, metadata=cli())  # simplify the ONNX graph with onnxslim (verified too)
    # int8: train images per dataset for calibration, a seeded subset through the run's preprocessing
    calibration_images: int = field(default=512, metadata=cli(metavar="N"))
    # int8 (onnx): the onnxruntime calibration method tried first; the others follow if it fails on validation
    calibration_method: str = field(default="minmax", metadata=cli(choices=CALIBRATION_METHODS))
    # int8: when no fully INT8 attempt passes on the validation split, auto keeps the layers that break it in
    # fp32 (NNCF accuracy control; for onnx also the per-layer repair)
    int8_fallback: str = field(default="auto", metadata=cli(choices=FALLBACKS))
    # int8 mixed precision: at most this many layers (NNCF: groups of operations) kept in fp32
    max_fp32_layers: int = field(default=8, metadata=cli(metavar="N"))
    # int8: quantization-aware fine-tuning on the run's train splits: auto when no post-training attempt passes,
    # always (the INT8 model as a training product: no post-training attempt), or off
    qat: str = field(default="auto", metadata=cli(choices=QAT_MODES))
    # int8: at most this many optimiser steps of quantization-aware fine-tuning (the INT8 budget bounds it too)
    qat_steps: int = field(default=100, metadata=cli(metavar="N"))
    # int8: seconds the INT8 searches of one export may take together (each at least a quarter of it); attempts
    # not started by then are skipped and recorded
    int8_budget_s: float = field(default=120.0, metadata=cli(metavar="SECONDS"))
    # gate: the largest accuracy drop per dataset (points), overriding the precision's
    max_acc_delta_points: float | None = field(
        default=None,
        metadata=cli(
            "--max-acc-delta", metavar="POINTS", type=float, default_text="fp32 0.5, fp16 0.3, int8 and bf16 1"
        ),
    )
    # gate: min top-1 agreement with PyTorch per head, overriding the precision's
    min_top1_agreement: float | None = field(
        default=None,
        metadata=cli(
            "--min-agreement", metavar="FRACTION", type=float, default_text="fp32 and fp16 0.99, int8 and bf16 off"
        ),
    )
    # gate: fail an artifact whose accuracy on the corrupted sample (noise, blur, JPEG at two severities) falls more
    # than this many points below PyTorch fp32's on the same images; the sample is measured and recorded either way
    robust_tolerance: float | None = field(default=None, metadata=cli(metavar="POINTS", type=float, default_text="off"))
    # gate: the one-sided confidence at which a lossy precision's (int8, bf16) accuracy drop is bounded
    gate_confidence: float | None = field(default=None, metadata=cli(metavar="LEVEL", type=float, default_text="0.95"))
    # an INT8 artifact that passes the gate but measures slower than its format's fp32 here: withhold it from
    # serving (status 'passed, but slower than fp32 here'), or offer it anyway, for its size
    slower_int8: str = field(default="withhold", metadata=cli(choices=SLOWER_INT8))

    def __post_init__(self) -> None:
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ConfigError(
                f"calibration method {self.calibration_method!r}; use one of {', '.join(CALIBRATION_METHODS)}"
            )
        if self.int8_fallback not in FALLBACKS:
            raise ConfigError(f"--int8-fallback {self.int8_fallback!r}; use one of {', '.join(FALLBACKS)}")
        if self.qat not in QAT_MODES:
            raise ConfigError(f"--qat {self.qat!r}; use one of {', '.join(QAT_MODES)}")
        if self.qat_steps < 1:
            raise ConfigError(f"--qat-steps must be >= 1, got {self.qat_steps}")
        if self.slower_int8 not in SLOWER_INT8:
            raise ConfigError(f"--slower-int8 {self.slower_int8!r}; use one of {', '.join(SLOWER_INT8)}")
        if self.calibration_images < 1:
            raise ConfigError(
                f"--calibration-images must be >= 1 (train images per dataset), got {self.calibration_images}"
            )
        if self.max_fp32_layers < 0:
            raise ConfigError(f"--max-fp32-layers must be >= 0, got {self.max_fp32_layers}")
        if not self.int8_budget_s > 0:
            raise ConfigError(f"--int8-budget-s must be > 0 seconds, got {self.int8_budget_s}")
        if self.max_acc_delta_points is not None and not self.max_acc_delta_points >= 0:
            raise ConfigError(f"--max-acc-delta must be >= 0 points, got {self.max_acc_delta_points}")
        if self.robust_tolerance is not None and not self.robust_tolerance >= 0:
            raise ConfigError(f"--robust-tolerance must be >= 0 points, got {self.robust_tolerance}")
        if self.gate_confidence is not None and not 0.5 <= self.gate_confidence < 1:
            raise ConfigError(f"--gate-confidence must be within [0.5, 1), got {self.gate_confidence}")
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise ConfigError(f"--min-agreement must be within [0, 1], got {self.min_top1_agreement}")

    def tolerance(self, spec: FormatSpec, precision: str) -> Tolerance:
        """The row's tolerance for `precision`, with this export's overrides."""
        tol = spec.tolerances[precision]
        return replace(
            tol,
            max_acc_delta_points=tol.max_acc_delta_points
            if self.max_acc_delta_points is None
            else self.max_acc_delta_points,
            min_top1_agreement=tol.min_top1_agreement if self.min_top1_agreement is None else self.min_top1_agreement,
            confidence=tol.confidence
            if self.gate_confidence is None or tol.confidence is None
            else self.gate_confidence,
        )


class BudgetSpent(Exception):
    """Raised inside a long INT8 attempt (accuracy control, the per-layer repair, fine-tuning) once the INT8
    budget is spent, or when quantization-aware training would not fit what is left; the search records the
    message as the attempt's status."""


class SharedQat(Protocol):
    """What the INT8 searches ask of the export's quantization-aware model (export/qat.py's QuantizationAware):
    the fine-tuned model and its record, trained on first use. A protocol, so this module imports no exporter."""

    def trained(
        self, calibration: np.ndarray, check: Callable[[], None], budget_s: float
    ) -> tuple[torch.nn.Module, dict[str, Any]]: ...


SEARCH_FLOOR_SHARE = 0.25  # of the INT8 budget: what a search gets even after the ones before it spent it all


@dataclass
class Int8Clock:
    """The INT8 budget of one export, shared by its INT8 searches (onnx-int8, openvino-int8): the search for
    the first artifact may spend it all, quantization-aware training included, and a later one still gets
    SEARCH_FLOOR_SHARE of it, enough for its post-training attempts and for converting the model the first search
    fine-tuned. So an export with two INT8 artifacts takes at most 1.25x the budget in INT8 work, not 2x."""

    seconds: float
    started: float | None = None  # time.monotonic() when the first search began

    def deadline(self) -> float:
        """The time.monotonic() at which a search starting now must stop."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
        return max(self.started + self.seconds, now + SEARCH_FLOOR_SHARE * self.seconds)


@dataclass
class ExportJob:
    """What export_run shares between the exporters of one export; each exporter is handed its own part."""

    model: torch.nn.Module  # ExportModule in eval mode, on CPU: images -> tuple of logits (head order)
    export_dir: Path
    precision: str  # one of the row's precisions
    device: str  # cpu | cuda | cuda:N: where device-specific artifacts (aoti) are compiled for
    head_names: list[str]
    image_size: int
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact name -> main file written this export
    options: ExportOptions = field(default_factory=ExportOptions)
    # images per dataset -> the calibration set: train images of every dataset, normalised (INT8)
    calibration: Callable[[int], Any] | None = None
    # the validation split with the PyTorch reference on it: what INT8 attempts are chosen by (never the test
    # split the gate judges the chosen artifact on)
    selection: SelectionSet | None = None
    # quantization-aware fine-tuning of the run's model, trained on first use and shared by the INT8 searches
    qat: SharedQat | None = None
    int8_clock: Int8Clock | None = None  # the INT8 searches' shared budget (None: each its own, as in tests)

    def example_input(self, batch: int = 2) -> torch.Tensor:
        import torch

        # batch 2, not 1: an exporter that sees batch 1 may specialise the dimension to a constant.
        return torch.zeros(batch, 3, self.image_size, self.image_size)

    def built(self, format: str, precision: str) -> Path:
        """The main file of an artifact this one is built from (written this export, or an earlier one)."""
        name = artifact_name(format, precision)
        return self.artifacts.get(name) or self.export_dir / artifact_files(format, precision)[0]


@dataclass
class Exported:
    """What an exporter reports: its own record (`details`, for people) and the fields serving reads."""

    details: dict[str, Any]
    batch_range: tuple[int, int] | None = None  # the batch range compiled in (TensorRT profile, AOTInductor)
    device: str | None = None  # the device it was compiled for (AOTInductor: cpu | cuda)
    built_for_gpu: str | None = None  # the GPU a TensorRT engine runs on
