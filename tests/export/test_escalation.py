"""The INT8 search's escalation, on constructed candidates: post-training fully INT8, then quantization-aware
fully INT8, then mixed precision, each rung tried only when the one before found nothing that passes."""

import time

import numpy as np
import pytest

from transferkit.artifact import TOLERANCES
from transferkit.export.int8 import Candidate, Engine, Plan, search
from transferkit.export.job import ExportOptions, Int8Clock, SelectionSet
from transferkit.export.verify import VerifyInputs

N = 2000  # validation images: enough for the bound to pass a model that agrees


def _selection() -> tuple[SelectionSet, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, N)
    reference = rng.normal(size=(N, 10)).astype(np.float32)
    reference[np.arange(N), labels] += 3.0  # about 90% right
    inputs = VerifyInputs(np.zeros((N, 1), np.float32), {"h": np.arange(N)}, {"h": labels}, {"h": {"d": N}})
    return SelectionSet(inputs, {"h": reference}, TOLERANCES["int8"]), {"h": reference}


def _worse(reference: dict[str, np.ndarray], images: int) -> dict[str, np.ndarray]:
    """The reference with the right answer of `images` images made wrong: a drop of images / N."""
    logits = reference["h"].copy()
    right = np.flatnonzero(logits.argmax(1) == _selection()[0].inputs.labels["h"])[:images]
    logits[right, logits[right].argmax(1)] -= 100.0
    return {"h": logits}


def _shifted(reference: dict[str, np.ndarray], lost: int, gained: int) -> dict[str, np.ndarray]:
    """The reference with `lost` right answers made wrong and `gained` wrong ones made right."""
    labels = _selection()[0].inputs.labels["h"]
    logits = reference["h"].copy()
    right = np.flatnonzero(logits.argmax(1) == labels)[:lost]
    wrong = np.flatnonzero(logits.argmax(1) != labels)[:gained]
    logits[right, labels[right]] -= 100.0
    logits[wrong, labels[wrong]] += 100.0
    return {"h": logits}


def _run(ptq_passes: bool | str, qat_passes: bool, qat: str = "auto"):
    selection, reference = _selection()
    bad, good = _worse(reference, 60), reference  # 3 points lost / none
    # 25 lost, 20 gained of 2000: the 95% bound is 0.80 (a pass), the 99.8% bound 1.2 (not a clear one)
    marginal = _shifted(reference, 25, 20)
    ptq = marginal if ptq_passes == "marginal" else good if ptq_passes else bad
    built: list[str] = []

    def plan(name: str, logits, **kind) -> Plan:
        def build() -> Candidate:
            built.append(name)
            return Candidate(logits)

        return Plan(name, {}, build, graph=name, **kind)

    plans = [
        plan("ptq", ptq),
        plan("qat", good if qat_passes else bad, qat=True),
        plan("mixed", good, mixed=True),
    ]
    result = search(plans, Engine(lambda model, images: model), selection, ExportOptions(qat=qat))
    return {a["name"]: a["status"] for a in result.attempts}, built, result


def test_post_training_int8_that_passes_ends_the_search():
    status, built, result = _run(ptq_passes=True, qat_passes=True)
    assert built == ["ptq"] and result.chosen_plan == "ptq"
    assert status["qat"].startswith("skipped: an attempt faster than fp32 passed")
    assert status["mixed"].startswith("skipped: an attempt faster than fp32 passed")


def test_quantization_aware_training_comes_before_mixed_precision():
    status, built, result = _run(ptq_passes=False, qat_passes=True)
    assert built == ["ptq", "qat"] and result.chosen_plan == "qat" and result.passed
    assert status == {
        "ptq": "failed on validation",
        "qat": "passed on validation",
        "mixed": "skipped: an attempt faster than fp32 passed (layers kept in fp32 only cost speed)",
    }


def test_mixed_precision_is_the_last_resort():
    status, built, result = _run(ptq_passes=False, qat_passes=False)
    assert built == ["ptq", "qat", "mixed"] and result.chosen_plan == "mixed"
    assert status["qat"] == "failed on validation"


def test_a_bare_pass_goes_on_to_quantization_aware_training_and_a_clear_pass_wins():
    """A post-training pass that would fail the gate about half the time is not the end: QAT is tried, and its
    clear pass is kept; mixed precision is not needed."""
    status, built, result = _run(ptq_passes="marginal", qat_passes=True)
    assert built == ["ptq", "qat"] and result.chosen_plan == "qat"
    attempts = {a["name"]: a for a in result.attempts}
    assert attempts["ptq"]["status"] == "passed on validation" and not attempts["ptq"]["clear_pass"]
    assert attempts["qat"]["clear_pass"] and status["mixed"].startswith("skipped: an attempt faster than fp32")


def test_a_bare_pass_is_kept_when_quantization_aware_training_does_no_better():
    status, built, result = _run(ptq_passes="marginal", qat_passes=False)
    assert built == ["ptq", "qat"] and result.chosen_plan == "ptq" and result.passed


@pytest.mark.parametrize(
    ("qat", "expected"),
    [("off", ["ptq", "mixed"]), ("always", ["qat"])],
)
def test_qat_off_and_always(qat, expected):
    _, built, _ = _run(ptq_passes=False, qat_passes=True, qat=qat)
    assert built == expected


def test_the_int8_budget_is_shared_by_the_searches_of_one_export_with_a_floor_for_each():
    selection, reference = _selection()
    bad = _worse(reference, 60)
    options = ExportOptions(int8_budget_s=0.8)  # a floor of 0.2 s per search
    clock = Int8Clock(options.int8_budget_s)

    def searched() -> dict[str, str]:
        def slow(name: str) -> Plan:
            def build() -> Candidate:
                time.sleep(0.3)  # more than the floor: the next attempt starts after the deadline
                return Candidate(bad)

            return Plan(name, {}, build, graph=name)

        result = search([slow("a"), slow("b"), slow("c")], Engine(lambda m, x: m), selection, options, clock=clock)
        return {a["name"]: a["status"] for a in result.attempts}

    first = searched()  # 0.9 s of attempts: the first search spends the whole budget and one attempt more
    assert first == {"a": "failed on validation", "b": "failed on validation", "c": "failed on validation"}
    second = searched()  # nothing is left of the budget: the floor still runs one attempt, and only one
    assert second["a"] == "failed on validation"
    assert second["b"] == second["c"] == "skipped: the export's INT8 budget of 0.8 s was spent"
    now = time.monotonic()
    assert clock.deadline() == pytest.approx(now + 0.2, abs=0.05)  # spent: a later search gets the floor
    fresh = Int8Clock(10.0)
    assert fresh.deadline() == pytest.approx(time.monotonic() + 10.0, abs=0.05)  # the first search: all of it
