"""The INT8 search's escalation, on constructed candidates: post-training fully INT8, then quantization-aware
fully INT8, then mixed precision, each rung tried only when the one before found nothing that passes."""

import numpy as np
import pytest

from transferkit.artifact import TOLERANCES
from transferkit.export.int8 import Candidate, Engine, Plan, search
from transferkit.export.job import ExportOptions, SelectionSet
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


def _run(ptq_passes: bool, qat_passes: bool, qat: str = "auto"):
    selection, reference = _selection()
    bad, good = _worse(reference, 60), reference  # 3 points lost / none
    built: list[str] = []

    def plan(name: str, logits, **kind) -> Plan:
        def build() -> Candidate:
            built.append(name)
            return Candidate(logits)

        return Plan(name, {}, build, graph=name, **kind)

    plans = [
        plan("ptq", good if ptq_passes else bad),
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


@pytest.mark.parametrize(
    ("qat", "expected"),
    [("off", ["ptq", "mixed"]), ("always", ["qat"])],
)
def test_qat_off_and_always(qat, expected):
    _, built, _ = _run(ptq_passes=False, qat_passes=True, qat=qat)
    assert built == expected
