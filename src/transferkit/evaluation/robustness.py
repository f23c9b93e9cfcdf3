"""`transferkit eval RUN --corruptions ... --attack ...`: what robustness adds to eval's outputs.

    result = evaluate_robustness(run, evaluation, "test", RobustnessOptions(corruptions="all", attack="fgsm"))
    print(result.table())                  # printed by the command, after the accuracy matrix
    result.to_dict()                       # eval.json's "robustness"
    result.figures()                       # one heatmap per dataset, (file name, matplotlib figure)
    result.markdown(saved_names)           # report.md's Robustness section, showing the saved heatmaps

The numbers come from corruption_eval.py (accuracy per corruption and severity, mCA, CE against --reference) and
attacks.py (FGSM / PGD on PyTorch, then the adversarial images as uint8 through every servable artifact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from transferkit.errors import ConfigError, TransferkitError
from transferkit.evaluation.attacks import AttackCell, exported_runtimes, score_attacks
from transferkit.evaluation.corruption_eval import (
    CorruptionCell,
    CorruptionResult,
    corruption_errors,
    reference_cell,
    score_corruptions,
    score_reference,
)
from transferkit.evaluation.corruptions import SOURCES
from transferkit.evaluation.matrix import Evaluation
from transferkit.evaluation.robust_options import RobustnessOptions
from transferkit.runs import Run, load_run

QUANTISED_NOTE = (
    "The adversarial images are rounded to uint8 (steps of 1/255), as a saved image file would hold them, before "
    "they go through the exported artifacts; `torch uint8` is PyTorch on those same rounded images, `torch` on the "
    "unrounded ones."
)


def check_reference(options: RobustnessOptions) -> None:
    """A --reference that is not a finished run is refused before anything loads."""
    if not options.reference:
        return
    try:
        run = load_run(options.reference)
    except TransferkitError as exc:
        raise ConfigError(f"--reference: {exc}") from None
    if not run.model_path.is_file():
        raise ConfigError(f"--reference {options.reference}: no model.pt yet; give a finished run")


def eps_text(eps: float) -> str:
    """2/255 for a budget on the uint8 grid, else the decimal."""
    if eps == 0:
        return "0"
    steps = Fraction(eps).limit_denominator(255) * 255
    return f"{int(steps)}/255" if steps.denominator == 1 and abs(eps * 255 - int(steps)) < 1e-9 else f"{eps:.4g}"


@dataclass
class RobustnessResult:
    options: RobustnessOptions
    split: str
    corruptions: CorruptionResult | None = None
    reference: CorruptionResult | None = None
    attacks: dict[str, dict[str, AttackCell]] | None = None
    artifacts: list[str] = field(default_factory=list)  # the artifacts the adversarial images went through
    skipped_artifacts: dict[str, str] = field(default_factory=dict)  # artifact -> why it was not scored

    def errors(self, dataset: str, cell: CorruptionCell) -> tuple[str | None, dict | None]:
        """(the reference's head for the dataset, CE and relative CE against it), or (None, None)."""
        found = reference_cell(self.reference, dataset) if self.reference else None
        return (found[0], corruption_errors(cell, found[1])) if found else (None, None)

    def to_dict(self) -> dict:
        out: dict = {"split": self.split, "images_per_dataset": self.options.robust_images}
        out["seed"] = self.options.robust_seed
        if self.corruptions is not None:
            datasets = {}
            for dataset, row in self.corruptions.cells.items():
                datasets[dataset] = {}
                for head, cell in row.items():
                    ref_head, errors = self.errors(dataset, cell)
                    extra = {"reference_head": ref_head, **errors} if errors else {}
                    datasets[dataset][head] = {**cell.to_dict(), **extra}
            out["corruptions"] = {
                "parameters": "CIFAR-10-C (Hendrycks & Dietterich 2019), pixel lengths x input side / 32",
                "corruptions": list(self.corruptions.corruptions),
                "severities": list(self.corruptions.severities),
                "sources": {c: SOURCES[c] for c in self.corruptions.corruptions},
                "datasets": datasets,
                "reference": None
                if self.reference is None
                else {
                    "run": self.reference.run,
                    "datasets": {d: {h: c.to_dict() for h, c in r.items()} for d, r in self.reference.cells.items()},
                },
            }
        if self.attacks is not None:
            out["attack"] = {
                "method": self.options.attack,
                "eps": list(self.options.eps_values),
                "steps": self.options.steps,
                "norm": "linf, on the 0..1 pixel scale",
                "artifacts": self.artifacts,
                "skipped_artifacts": self.skipped_artifacts,
                "note": QUANTISED_NOTE,
                "datasets": {d: {h: c.to_dict() for h, c in row.items()} for d, row in self.attacks.items()},
            }
        return out

    # ---- text and Markdown ----
    def _corruption_grid(self, dataset: str, head: str, cell: CorruptionCell, markdown: bool) -> list[str]:
        severities = self.corruptions.severities
        ref_head, errors = self.errors(dataset, cell)
        header = ["corruption", *(f"s{s}" for s in severities), "mean"] + (["CE", "rel. CE"] if errors else [])
        rows = []
        for name, by_severity in cell.accuracy.items():
            row = [name, *(f"{by_severity[s]:.4f}" for s in severities), f"{cell.mean(name):.4f}"]
            if errors:
                row += [_percent(errors["ce"][name]), _percent(errors["relative_ce"][name])]
            rows.append(row)
        summary = f"clean {cell.clean:.4f}, mCA {cell.mca:.4f} ({cell.images} images)"
        if errors:
            summary += (
                f", mCE {_percent(errors['mce'])}, relative mCE {_percent(errors['relative_mce'])} "
                f"against {self.reference.run} head {ref_head}"
            )
        title = f"{dataset}, head {head}{' (trained on it)' if cell.own else ''}: {summary}"
        return [title, *_table(header, rows, markdown)]

    def _attack_rows(self, markdown: bool) -> list[str]:
        names = self.artifacts
        header = ["dataset", "head", "clean", "eps", "torch", "torch uint8", *names]
        rows = []
        for dataset, row in self.attacks.items():
            for head, cell in row.items():
                for eps in self.options.eps_values:
                    rows.append(
                        [dataset, head + ("*" if cell.own else ""), f"{cell.clean:.4f}", eps_text(eps)]
                        + [f"{cell.pytorch[eps]:.4f}", f"{cell.pytorch_uint8[eps]:.4f}"]
                        + [f"{cell.artifacts[n][eps]:.4f}" for n in names]
                    )
        return _table(header, rows, markdown)

    def _attack_title(self) -> str:
        steps = (
            f", {self.options.steps} steps of 2.5 eps / steps from a random start"
            if self.options.attack == "pgd"
            else ""
        )
        return (
            f"{self.options.attack.upper()} (white-box on PyTorch, L-infinity eps on the 0..1 pixel scale{steps}): "
            f"accuracy on {self.options.robust_images} or fewer {self.split} images per dataset (* = the head was "
            "trained on that dataset)"
        )

    def table(self) -> str:
        """What the command prints after the accuracy matrix."""
        lines = []
        if self.corruptions is not None:
            lines.append(
                f"accuracy under corruptions (CIFAR-10-C severities; a seeded subset of {self.options.robust_images} "
                f"or fewer {self.split} images per dataset, seed {self.options.robust_seed})"
            )
            for dataset, row in self.corruptions.cells.items():
                for head, cell in row.items():
                    lines += ["", *self._corruption_grid(dataset, head, cell, markdown=False)]
        if self.attacks is not None:
            lines += ["", self._attack_title(), *self._attack_rows(markdown=False), QUANTISED_NOTE]
            lines += [f"{name}: not scored: {why}" for name, why in self.skipped_artifacts.items()]
        return "\n".join(lines).strip("\n")

    def markdown(self, plots: list[str]) -> list[str]:
        """report.md's Robustness section."""
        lines = ["## Robustness", ""]
        if self.corruptions is not None:
            lines += [
                "### Common corruptions",
                "",
                f"Hendrycks & Dietterich's corruptions at CIFAR-10-C's severities (pixel lengths scaled by the input "
                f"side / 32), applied to the uint8 pixels the model sees, on a seeded subset of "
                f"{self.options.robust_images} or fewer {self.split} images per dataset (seed "
                f"{self.options.robust_seed}). mCA: mean accuracy over every corruption and severity. CE: errors "
                "summed over severities, over the reference's; relative CE: accuracy lost to the corruption (clean "
                "minus corrupted, summed), over the reference's loss. Below 100% is more robust than the reference.",
                "",
            ]
            for dataset, row in self.corruptions.cells.items():
                for head, cell in row.items():
                    title, *table = self._corruption_grid(dataset, head, cell, markdown=True)
                    lines += [f"**{title}**", "", *table, ""]
            lines += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
        if self.attacks is not None:
            lines += ["### Adversarial examples", "", self._attack_title() + ".", "", *self._attack_rows(True), ""]
            lines += [QUANTISED_NOTE, ""]
            lines += [f"- `{name}` not scored: {why}" for name, why in self.skipped_artifacts.items()]
        return lines

    def figures(self) -> list[tuple[str, object]]:
        """One heatmap per dataset (corruption x severity, a panel per head): (robustness_<dataset>.png, figure)."""
        if self.corruptions is None:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = []
        severities = self.corruptions.severities
        for dataset, row in self.corruptions.cells.items():
            fig, axes = plt.subplots(
                1,
                len(row),
                figsize=(
                    1.8 + 0.75 * len(severities) * len(row) + 1.6 * (len(row) - 1),
                    1.6 + 0.3 * len(self.corruptions.corruptions),
                ),
                squeeze=False,
            )
            for ax, (head, cell) in zip(axes[0], row.items()):
                grid = np.array([[cell.accuracy[c][s] for s in severities] for c in cell.accuracy])
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_xticks(range(len(severities)), [str(s) for s in severities])
                ax.set_yticks(range(len(cell.accuracy)), list(cell.accuracy))
                for (i, j), v in np.ndenumerate(grid):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if v < 0.6 else "k")
                ax.set_xlabel("severity")
                ax.set_title(f"head {head}: clean {cell.clean:.2f}, mCA {cell.mca:.2f}", fontsize=9)
            fig.suptitle(f"{dataset}: accuracy under corruption")
            fig.colorbar(im, ax=axes[0].tolist(), fraction=0.04)
            safe = re.sub(r"[^\w.-]+", "_", dataset)
            names.append((f"robustness_{safe}.png", fig))
        return names


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


_NAME_COLUMNS = {"corruption", "dataset", "head"}  # text, aligned left; numbers align right


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "".join("---|" if h in _NAME_COLUMNS else "--:|" for h in header),
        ]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = [h in _NAME_COLUMNS for h in header]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(cells, widths, left)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def evaluate_robustness(run: Run, evaluation: Evaluation, split: str, options: RobustnessOptions) -> RobustnessResult:
    """The corruption benchmark and the attack asked for, on the model and data the matrix was scored with."""
    model, datasets, device = evaluation.model, evaluation.datasets, evaluation.device
    result = RobustnessResult(options, split)
    if options.corruption_names:
        result.corruptions = score_corruptions(model, run, datasets, split, options, device)
        if options.reference:
            result.reference = score_reference(
                options.reference, datasets, run.preprocessing, split, options, device, run.config.limit
            )
    if options.attack:
        runtimes, result.skipped_artifacts = exported_runtimes(run)
        result.artifacts = list(runtimes)
        result.attacks = score_attacks(model, run, datasets, split, options, device, runtimes)
    return result
