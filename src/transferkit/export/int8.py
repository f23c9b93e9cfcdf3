"""The INT8 search: several ways to quantize one artifact, each judged on the validation split, the fastest that
passes kept, all within a time budget.

    plans (per runtime: export/quantize.py for ONNX Runtime, export/openvino.py for OpenVINO), in order:
        post-training fully INT8: the tool's calibration methods and options (minmax, percentile, entropy,
                             bias correction, more calibration images, ...)
        quantization-aware fully INT8 (unless an attempt faster than fp32 passed clearly, and --qat auto):
                             NNCF's quantizers in the PyTorch model, fine-tuned on the run's train splits
                             (export/qat.py), once per export and shared by both formats
        mixed-precision attempts (only while no attempt faster than fp32 has passed, and --int8-fallback
                             auto): the per-layer repair (ONNX), NNCF accuracy control, each keeping the
                             operations that hurt most in fp32
    `--qat always` skips the post-training attempts (the quantization-aware model is wanted as such) and
    `--qat off` the quantization-aware one.
    for each plan, while the budget (--int8-budget-s) lasts (long attempts also stop when it runs out):
        build it -> logits on the validation split -> SelectionSet.report (the gate's statistic)
        passed -> images/s at batch 32, measured here, and whether the pass is clear (SelectionSet.clear);
                  later plans of the same quantized graph are skipped
    quantization-aware attempts run unless a post-training one passed clearly and faster than fp32 (a bare pass
    fails the gate on test about half the time); mixed precision runs unless a fully INT8 one passed faster
    keep, among those that passed, one faster than fp32, then a clear pass, then the fastest (none passed: the
    closest, so the gate reports real numbers and it is not served); export_run then gates the kept model once
    on the held-out test split

Why quantization-aware training comes before mixed precision: it keeps every layer in INT8 (the speed) and
recovers the accuracy by training, where mixed precision gives the speed of the layers it keeps in fp32 away.
Why fully INT8 attempts stop the search before mixed precision: every layer kept in fp32 costs speed, so a
mixed-precision model is only worth building when no fully INT8 one is accurate enough. Every attempt, with its
settings, seconds, validation numbers and speed, goes into the manifest entry and verify.json ("attempts").

NNCF accuracy control (`nncf.quantize_with_accuracy_control`) takes a scalar metric and a `max_drop`; here the
metric is one minus the gate's violation on the validation split (the largest, over datasets, of the accuracy
drop's upper confidence bound over the tolerance), and `max_drop` is set so that NNCF stops exactly where the
gate's statistic passes; the ranking of what to keep in fp32 uses per-image top-1 agreement with PyTorch.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from transferkit.artifact import INPUT_NAME
from transferkit.errors import one_line
from transferkit.export.job import BudgetSpent, ExportOptions, Int8Clock, SelectionSet, violation_of
from transferkit.export.measure import MEASURE_BATCH, batch_of
from transferkit.machine import median_seconds

LOGIT_BATCH = 64  # images per call when computing validation logits


@dataclass
class Candidate:
    """A quantized model one plan produced (an onnx.ModelProto or an openvino.Model)."""

    model: Any
    fp32_layers: list[str] = field(default_factory=list)  # what it keeps in fp32, named for people
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    name: str  # ort-minmax, nncf, nncf-accuracy-control, ...
    settings: dict[str, Any]  # the tool and its options, as recorded
    build: Callable[[], Candidate]
    mixed: bool = False  # keeps layers in fp32: tried only when no fully INT8 plan passed
    qat: bool = False  # quantization-aware fine-tuning: tried unless a post-training plan passed clearly (--qat auto)
    # plans with the same `graph` quantize the same operations the same way and differ only in their scales, so
    # they run at the same speed: once one passes, the others of its graph cannot be faster and are skipped
    graph: str = ""


@dataclass
class Engine:
    """How the search runs a candidate: logits on images, and the model's speed at batch 32 on this machine."""

    logits: Callable[[Any, np.ndarray], dict[str, np.ndarray]]
    deadline: float | None = None  # time.monotonic() at which the search's budget is spent (set by search)

    def check_deadline(self) -> None:
        """Long attempts call this between their steps, so one attempt cannot overrun the budget by minutes."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BudgetSpent("stopped: the INT8 budget ran out during this attempt")

    def images_per_second(self, model: Any, sample: np.ndarray, repeats: int = 5) -> float:
        x = batch_of(sample)
        return MEASURE_BATCH / median_seconds(lambda: self.logits(model, x), repeats)


class Passed(NamedTuple):
    """An attempt that passed on validation, with what the choice among them reads."""

    images_per_second: float
    plan: str
    candidate: Candidate
    fast: bool  # faster than fp32 here
    clear: bool  # passes at the clear confidence too (SelectionSet.clear)


@dataclass
class SearchResult:
    chosen: Candidate | None  # the fastest that passed on validation, else the closest; None if all failed
    chosen_plan: str | None
    passed: bool  # the chosen one passed on the validation split
    attempts: list[dict[str, Any]]
    fp32_images_per_second: float | None = None  # the fp32 model in the same engine, for the speedups


def search(
    plans: list[Plan],
    engine: Engine,
    selection: SelectionSet,
    options: ExportOptions,
    fp32_model: Any = None,
    clock: Int8Clock | None = None,
) -> SearchResult:
    """Run the plans (see the module docstring). `fp32_model`: timed once in the same engine, so each attempt's
    speed is also recorded as a ratio to fp32 on this machine (an INT8 model slower than fp32 is worth knowing).
    `clock`: the export's INT8 budget, shared with its other searches (None: this search has all of it)."""
    deadline = (clock or Int8Clock(options.int8_budget_s)).deadline()
    engine.deadline = deadline
    fp32_speed = engine.images_per_second(fp32_model, selection.inputs.batch) if fp32_model is not None else None
    attempts: list[dict[str, Any]] = []
    passing: list[Passed] = []
    passed_graphs: set[str] = set()
    closest: tuple[float, str, Candidate] | None = None
    hopeless = selection.unreachable()  # a split too small for the bound: one attempt, for the gate's numbers
    for plan in plans:
        record: dict[str, Any] = {
            "name": plan.name,
            "settings": plan.settings,
            "mixed_precision": plan.mixed,
            "quantization_aware": plan.qat,
        }
        attempts.append(record)
        if hopeless and len(attempts) > 1:
            record["status"] = f"skipped: {hopeless}; nothing can pass (more --verify-images, or --max-acc-delta)"
            continue
        if plan.graph and plan.graph in passed_graphs:
            record["status"] = "skipped: an attempt with the same quantized graph passed (it runs at the same speed)"
            continue
        if plan.qat and options.qat == "off":
            record["status"] = "skipped: --qat off"
            continue
        if not (plan.qat or plan.mixed) and options.qat == "always":
            record["status"] = "skipped: --qat always (the quantization-aware model is the INT8 model)"
            continue
        if plan.mixed and any(p.fast for p in passing):
            record["status"] = "skipped: an attempt faster than fp32 passed (layers kept in fp32 only cost speed)"
            continue
        if plan.qat and options.qat == "auto" and any(p.fast and p.clear for p in passing):
            record["status"] = "skipped: an attempt faster than fp32 passed clearly (fine-tuning cannot make it faster)"
            continue
        if plan.mixed and options.int8_fallback == "off":
            record["status"] = "skipped: --int8-fallback off"
            continue
        if time.monotonic() >= deadline:
            record["status"] = f"skipped: the export's INT8 budget of {options.int8_budget_s:g} s was spent"
            continue
        t = time.perf_counter()
        try:
            candidate = plan.build()
            logits = engine.logits(candidate.model, selection.inputs.batch)
            report = selection.report(logits)
            violation = violation_of(report)  # from the same report: one comparison, not two
        except BudgetSpent as exc:
            record.update(status=str(exc), seconds=round(time.perf_counter() - t, 1))
            continue
        except Exception as exc:  # noqa: BLE001 - one failed attempt is recorded, the search goes on
            record.update(status="error", error=one_line(exc), seconds=round(time.perf_counter() - t, 1))
            continue
        record.update(
            _numbers(report), violation=round(violation, 4), fp32_layers=candidate.fp32_layers, **candidate.notes
        )
        if report["passed"]:
            speed = engine.images_per_second(candidate.model, selection.inputs.batch)
            fast = fp32_speed is None or speed > fp32_speed
            clear = selection.clear(logits)
            record.update(
                status="passed on validation" if fast else "passed on validation, slower than fp32 here",
                images_per_second=round(speed, 1),
                clear_pass=clear,
            )
            if fp32_speed:
                record["speedup_vs_fp32"] = round(speed / fp32_speed, 2)
            passing.append(Passed(speed, plan.name, candidate, fast, clear))
            if fast:  # a slower one does not end the search: another graph of these scales may be fast
                passed_graphs.add(plan.graph)
        else:
            record["status"] = "failed on validation"
            if closest is None or violation < closest[0]:
                closest = (violation, plan.name, candidate)
        record["seconds"] = round(time.perf_counter() - t, 1)
    if passing:  # faster than fp32 first, then a clear pass, then the fastest
        best = max(passing, key=lambda p: (p.fast, p.clear, p.images_per_second))
        return SearchResult(best.candidate, best.plan, True, attempts, fp32_speed)
    if closest is not None:
        return SearchResult(closest[2], closest[1], False, attempts, fp32_speed)
    return SearchResult(None, None, False, attempts, fp32_speed)


def qat_plan(
    job_qat: Any,
    calibration: np.ndarray,
    engine: Engine,
    convert: Callable[[Any], Any],
    settings: dict[str, Any],
    name: str = "qat",
) -> Plan:
    """The quantization-aware attempt of one search: the shared fine-tuned model (trained on first use, within
    QAT_BUDGET_SHARE of what is left of this search's budget), converted by `convert` to the search's format."""

    def build() -> Candidate:
        left = (engine.deadline - time.monotonic()) if engine.deadline is not None else 600.0
        if left <= 0:
            raise BudgetSpent("skipped: the INT8 budget was spent before quantization-aware training")
        model, record = job_qat.trained(calibration, engine.check_deadline, QAT_BUDGET_SHARE * left)
        return Candidate(convert(model), notes={"qat": record})

    return Plan(name, settings, build, qat=True, graph=name)


QAT_BUDGET_SHARE = 0.6  # of the search's remaining budget: the rest converts, validates and times the result


def _numbers(report: dict[str, Any]) -> dict[str, Any]:
    datasets = [(ds, v) for h in report["heads"].values() for ds, v in h["per_dataset"].items()]
    agreement = {h: round(v["top1_agreement"], 5) for h, v in report["heads"].items()}
    return {
        "validation": {
            "accuracy_delta_points": {ds: round(v["accuracy_delta_points"], 3) for ds, v in datasets},
            "drop_upper_points": {ds: v["drop_upper_points"] for ds, v in datasets},
            "images": {ds: v["images"] for ds, v in datasets},
            "top1_agreement": agreement,
            "failures": report["failures"],
        }
    }


def batched_logits(
    run: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray, heads: list[str]
) -> dict[str, np.ndarray]:
    parts = [run(images[i : i + LOGIT_BATCH]) for i in range(0, len(images), LOGIT_BATCH)]
    return {h: np.concatenate([p[h] for p in parts]) for h in heads}


class _RevertedOps(logging.Handler):
    """The operation names NNCF's accuracy restorer reports, at its end, as kept in fp32 (its own report; it
    logs intermediate reverts too, some of which it steps back from)."""

    PATTERN = re.compile(r"\d+ out of \d+ were reverted back to the floating-point precision:\s*(.*)", re.S)

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.names = [n.strip() for n in match.group(1).splitlines() if n.strip()]


def nncf_accuracy_control(
    model: Any,
    calibration: np.ndarray,
    selection: SelectionSet,
    engine: Engine,
    options: ExportOptions,
    **quantize_args: Any,
) -> Candidate:
    """nncf.quantize_with_accuracy_control with the gate's metric on the validation split (see the module
    docstring); at most --max-fp32-layers groups of operations are reverted to fp32."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    batch = selection.inputs.batch
    head_of_row = np.empty(len(batch), dtype=object)
    for head, rows in selection.inputs.rows.items():
        head_of_row[rows] = head

    def validation_fn(compiled: Any, items: Any) -> tuple[float, list[float]]:
        engine.check_deadline()  # NNCF validates after every step: the budget is checked as often
        rows = np.array([item["row"] for item in items], dtype=np.int64)
        logits = engine.logits(compiled, batch[rows])
        agree = [
            float(logits[head_of_row[r]][i].argmax() == selection.reference[head_of_row[r]][r].argmax())
            for i, r in enumerate(rows)
        ]
        return 1.0 - selection.violation(logits, rows), agree

    calibration_set = nncf.Dataset([{INPUT_NAME: calibration[i : i + 1]} for i in range(len(calibration))])
    validation_set = nncf.Dataset(
        [{"row": i} for i in range(len(batch))], lambda item: {INPUT_NAME: batch[item["row"] : item["row"] + 1]}
    )
    reverted = _RevertedOps()
    logger = logging.getLogger("nncf")
    logger.addHandler(reverted)
    try:
        quantized = nncf.quantize_with_accuracy_control(
            model,
            calibration_set,
            validation_set,
            validation_fn,
            # NNCF measures the drop from the fp32 model's own metric, 1 - v0 (v0 > 0: the bound of a model that
            # agrees on every image is not zero), so `v <= 1`, the gate's pass, is a drop of at most 1 - v0
            max_drop=max(1e-3, 1.0 - selection.violation(selection.reference)),
            drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(calibration),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=max(1, options.max_fp32_layers)
            ),
            **quantize_args,
        )
    finally:
        logger.removeHandler(reverted)
    return Candidate(quantized, reverted.names)


SPLITS = {"calibration": "train", "selection": "val", "gate": "test"}


def int8_details(
    built_from: str, result: SearchResult, calibration: np.ndarray, selection: SelectionSet, options: ExportOptions
) -> dict[str, Any]:
    """The manifest details of an INT8 artifact: what was chosen, from which attempts, on which splits."""
    chosen = result.chosen
    return {
        "built_from": built_from,
        "quantization": {
            "chosen": result.chosen_plan,
            "passed_on_validation": result.passed,
            "calibration_images": int(len(calibration)),
            "calibration_images_per_dataset": options.calibration_images,
            "budget_s": options.int8_budget_s,  # shared by the export's INT8 searches (job.Int8Clock)
            "fallback": options.int8_fallback,
            "qat": options.qat,
            "chosen_at_confidence": selection.tolerance.confidence,
            "fp32_images_per_second": round(result.fp32_images_per_second, 1)
            if result.fp32_images_per_second
            else None,
        },
        "fp32_layers": chosen.fp32_layers if chosen else [],
        "splits": dict(SPLITS),
        "selection_images": {h: dict(d) for h, d in selection.inputs.datasets.items()},
        "attempts": result.attempts,
    }
