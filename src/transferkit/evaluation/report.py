"""`transferkit eval RUN`: the evaluation matrix, eval.json, report.md and its PNG plots.

    result = evaluate_run("runs/mnist-fashion")   # scores every head on every dataset it can score
    print(result.table)                            # also in result.report_path (report.md, with the plots)
    evaluate_run(run, robustness=RobustnessOptions(corruptions="all", attack="pgd"))   # and its robustness

The matrix itself (which head can score which dataset, accuracy and coverage per cell) is computed by
transferkit.evaluation.matrix, robustness by transferkit.evaluation.robustness; this module writes what a reader
looks at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.evaluation.costs import ModelCost, format_costs, format_side_by_side, measure_costs
from transferkit.evaluation.matrix import Matrix, evaluate_all, format_matrix
from transferkit.evaluation.robust_options import RobustnessOptions
from transferkit.evaluation.robustness import RobustnessResult, check_reference, evaluate_robustness
from transferkit.runs import load_run
from transferkit.utils import atomic_write, atomic_write_json, atomic_write_text, read_json

# Beyond this many classes the cell text is smaller than the pixels it sits on (CIFAR-100: 10,000 cells);
# the colours still show the confusion.
_MAX_ANNOTATED_CLASSES = 30


@dataclass
class EvalResult:
    table: str
    eval_path: Path
    report_path: Path
    matrix: Matrix
    source: Matrix | None
    teachers: dict[str, Matrix | None] = field(default_factory=dict)  # distilled runs: teacher dir -> matrix
    costs: list[ModelCost] = field(default_factory=list)  # distilled runs: student, then each teacher
    robustness: RobustnessResult | None = None  # with --corruptions or --attack


def evaluate_run(
    run_dir: str | Path,
    extra_data: list[str] | None = None,
    split: str = "test",
    robustness: RobustnessOptions | None = None,
) -> EvalResult:
    robustness = robustness or RobustnessOptions()
    run = load_run(run_dir)
    if robustness.active:
        check_reference(robustness)  # before anything loads
    evaluation = evaluate_all(run, extra_data, split)
    matrix, source, teachers = evaluation.matrix, evaluation.source, evaluation.teachers
    table = format_matrix(matrix, f"accuracy on the {split} split (rows: heads, columns: datasets)")
    if source is not None:
        table += "\n\n" + format_matrix(source, f"source run {run.config.init} on the same datasets")
    costs = []
    if teachers:
        costs = measure_costs(run)
        table += "\n\n" + format_side_by_side(matrix, teachers, split) + "\n\n" + format_costs(costs)
    payload = {
        "split": split,
        "accuracy": {d: c.accuracy for row in matrix.cells.values() for d, c in row.items() if c.own},
        "matrix": matrix.to_dict(),
        "source": None if source is None else {"run": run.config.init, "matrix": source.to_dict()},
    }
    if teachers:
        payload["teachers"] = [{"run": t, "matrix": None if m is None else m.to_dict()} for t, m in teachers.items()]
        payload["costs"] = [c.to_dict() for c in costs]
    robust, sections = None, []
    if robustness.active:
        robust = evaluate_robustness(run, evaluation, split, robustness)
        table += "\n\n" + robust.table()
        payload["robustness"] = robust.to_dict()
        sections = robust.markdown([_save_figure(fig, run.dir / name) for name, fig in robust.figures()])
    eval_path = atomic_write_json(run.dir / "eval.json", payload)
    plots = _plots(run.dir, matrix, run.labels.heads)
    report = _report_markdown(run, table, plots, sections)
    report_path = atomic_write_text(run.dir / "report.md", report)
    return EvalResult(table, eval_path, report_path, matrix, source, teachers, costs, robust)


def _save_figure(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path.name


def _plots(run_dir: Path, matrix: Matrix, classes: dict[str, list[str]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    grid = np.full((len(matrix.heads), len(matrix.datasets)), np.nan)
    for i, h in enumerate(matrix.heads):
        for j, d in enumerate(matrix.datasets):
            if d in matrix.cells[h]:
                grid[i, j] = matrix.cells[h][d].accuracy
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(matrix.datasets), 1.2 + 0.6 * len(matrix.heads)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(matrix.datasets)), matrix.datasets, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.heads)), matrix.heads)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xlabel("dataset")
    ax.set_ylabel("head")
    fig.colorbar(im, ax=ax, fraction=0.05)
    names.append(_save_figure(fig, run_dir / "eval_matrix.png"))

    for head, cm in matrix.confusion.items():
        names.append(_save_figure(_confusion_figure(head, cm, classes[head]), run_dir / f"confusion_{head}.png"))

    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        history = read_json(metrics)["history"]
        epochs = [h["epoch"] for h in history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
        a1.plot(epochs, [h["train_loss"] for h in history], marker="o")
        a1.set_title("train loss")
        a1.set_xlabel("epoch")
        for name in history[0]["val_acc"]:
            a2.plot(epochs, [h["val_acc"][name] for h in history], marker="o", label=name)
        a2.set_title("validation accuracy")
        a2.set_xlabel("epoch")
        a2.legend()
        names.append(_save_figure(fig, run_dir / "training_curves.png"))
    return names


def _confusion_figure(head: str, cm: np.ndarray, classes: list[str]):
    """Rows: true class, normalised to sum to 1 (recall on the diagonal); axes named by class."""
    import matplotlib.pyplot as plt

    n = len(classes)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    side = min(max(5.0, 0.5 * n + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    slanted = max(map(len, classes)) > 2  # names like "T-shirt/top" would overlap side by side
    ax.set_xticks(range(n), classes, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    ax.set_yticks(range(n), classes)
    if n <= _MAX_ANNOTATED_CLASSES:
        for (i, j), v in np.ndenumerate(norm):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if v > 0.5 else "k")
    ax.set_title(f"confusion: head {head} ({int(cm.sum())} images, rows sum to 1)")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def _report_markdown(run, table: str, plots: list[str], sections: list[str]) -> str:
    cfg = run.config
    lines = [
        f"# transferkit report: {run.dir.name}",
        "",
        f"- backbone: `{cfg.backbone}` ({cfg.weights} weights), input {cfg.image_size}px",
        f"- datasets: {', '.join(cfg.data)}" + (f"; unlabeled: {', '.join(cfg.unlabeled)}" if cfg.unlabeled else ""),
        "- heads: " + ", ".join(f"`{h}` ({len(c)} classes)" for h, c in run.labels.heads.items()),
        f"- epochs {cfg.epochs}, batch {cfg.batch_size}, lr {cfg.lr}, seed {cfg.seed}"
        + (f", init from `{cfg.init}`" if cfg.init else ""),
    ]
    if cfg.teachers:
        lines.append(
            f"- distilled from {', '.join(f'`{t}`' for t in cfg.teachers)} (temperature {cfg.temperature}, "
            f"kd_weight {cfg.kd_weight})"
        )
    lines += [
        "",
        "## Evaluation matrix",
        "",
        "```",
        table,
        "```",
        "",
    ]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    if sections:
        lines += ["", *sections]
    return "\n".join(lines) + "\n"
