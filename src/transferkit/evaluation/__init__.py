"""Evaluation of a finished run (`transferkit eval`): the head x dataset accuracy matrix, eval.json,
report.md with a heatmap, one confusion matrix per head and the training curves; with --corruptions and --attack,
its robustness too.

`evaluate_run` and `EvalResult` load on first use (they bring torch), so that the CLI can read the options in
`transferkit.evaluation.robust_options` while it builds its parser, without importing torch."""

from __future__ import annotations

from typing import Any

__all__ = ["EvalResult", "evaluate_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from transferkit.evaluation import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
