"""Evaluation of a finished run (`transferkit eval`): the head x dataset accuracy matrix, eval.json,
report.md with a heatmap, one confusion matrix per head and the training curves."""

from transferkit.evaluation.report import EvalResult, evaluate_run

__all__ = ["EvalResult", "evaluate_run"]
