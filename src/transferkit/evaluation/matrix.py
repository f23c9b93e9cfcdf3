"""The evaluation matrix (integration and test): every head scored on every dataset whose class names map
into it. A cell is the accuracy over the dataset's images whose class exists in the head, with the
coverage (share of images that could be scored). A run started with --init also scores its source run on
the same datasets, side by side, and a distilled run scores each of its teachers the same way."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from transferkit.data import DatasetSpec, ImageDataset, load_dataset
from transferkit.preprocess import Preprocessing
from transferkit.runs import Run, load_run_model
from transferkit.training.evaluate import accuracy, confusion_matrix, predict_logits
from transferkit.training.labels import LabelMap, class_index_map


@dataclass
class Cell:
    accuracy: float
    n: int  # images scored
    coverage: float  # scored / all images of the split
    own: bool  # the head was trained on this dataset

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "coverage": self.coverage, "own": self.own}


@dataclass
class Matrix:
    heads: list[str]
    datasets: list[str]
    cells: dict[str, dict[str, Cell]]  # head -> dataset -> cell
    confusion: dict[str, np.ndarray] = field(default_factory=dict)  # head -> on its own datasets

    def to_dict(self) -> dict:
        return {h: {d: c.to_dict() for d, c in row.items()} for h, row in self.cells.items()}


def dataset_specs(run: Run, extra: list[str] | None) -> list[DatasetSpec]:
    """The run's labelled and unlabeled datasets, then `extra`, each once. Captured traffic has no labels to
    score against (`transferkit compare --traffic` judges a run on it)."""
    specs = [DatasetSpec.parse(s, with_head=False) for s in run.config.data]
    specs += [DatasetSpec.parse(s).without_head() for s in run.config.unlabeled if DatasetSpec.parse(s).traffic is None]
    specs += [DatasetSpec.parse(s, with_head=False) for s in extra or []]
    return list(dict.fromkeys(specs))


def head_targets(run: Run, ds: ImageDataset, labels: np.ndarray) -> dict[str, np.ndarray]:
    """head -> the class index in that head of each of `labels` (ds's classes), -1 where the head lacks the
    class; only heads sharing at least one class name with the dataset."""
    label_map = LabelMap.from_file(run.config.label_map)
    targets = {}
    for head, classes in run.labels.heads.items():
        mapping = class_index_map(ds.classes, classes, label_map)
        if mapping:
            targets[head] = np.asarray([mapping.get(int(c), -1) for c in labels], dtype=np.int64)
    return targets


def score_matrix(model, run: Run, datasets: list[ImageDataset], split: str, device="cpu") -> Matrix:
    heads = run.labels.heads
    cells: dict[str, dict[str, Cell]] = {h: {} for h in heads}
    confusion: dict[str, np.ndarray] = {}
    for ds in datasets:
        part = ds.split(split)
        logits = predict_logits(model, part.images, run.preprocessing, device)
        for head, target in head_targets(run, ds, part.labels).items():
            keep = target >= 0
            own = run.labels.datasets.get(ds.name) == head
            cells[head][ds.name] = Cell(
                accuracy(logits[head][keep], target[keep]), int(keep.sum()), float(keep.mean()), own
            )
            if own:
                cm = confusion_matrix(logits[head][keep].argmax(1), target[keep], len(heads[head]))
                confusion[head] = confusion.get(head, 0) + cm
    return Matrix(list(heads), [d.name for d in datasets], cells, confusion)


@dataclass
class Evaluation:
    matrix: Matrix  # the run's own heads
    source: Matrix | None = None  # the --init source run on the same datasets
    # teacher run dir -> its matrix on the same datasets; None when the teacher run has gone since
    teachers: dict[str, Matrix | None] = field(default_factory=dict)
    # what was loaded to score the matrix, kept for the robustness evaluation (the same model, data and device)
    model: torch.nn.Module | None = field(default=None, repr=False)
    datasets: list[ImageDataset] = field(default_factory=list, repr=False)
    device: str = "cpu"


def evaluate_matrices(run: Run, extra: list[str] | None, split: str) -> tuple[Matrix, Matrix | None]:
    """-> (this run's matrix, the --init source run's matrix on the same datasets, or None)."""
    result = evaluate_all(run, extra, split, teachers=False)
    return result.matrix, result.source


def evaluate_all(run: Run, extra: list[str] | None, split: str, teachers: bool = True) -> Evaluation:
    """This run's matrix, and every other run it was made from (--init source, teachers) scored on the same
    datasets, each model seeing them at its own input definition."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_run_model(run.dir)
    model.to(device, memory_format=torch.channels_last)
    specs = dataset_specs(run, extra)
    datasets = [load_dataset(spec, run.preprocessing, run.config.limit) for spec in specs]
    loaded = {run.preprocessing: datasets}  # the data at each input definition, loaded once
    result = Evaluation(
        score_matrix(model, run, datasets, split, device), model=model, datasets=datasets, device=device
    )
    if run.config.init:
        result.source = _score_other(run.config.init, specs, loaded, run.config.limit, split, device)
    for teacher in run.config.teachers if teachers else []:
        gone = not Path(teacher).is_dir()
        result.teachers[teacher] = (
            None if gone else _score_other(teacher, specs, loaded, run.config.limit, split, device)
        )
    return result


def _score_other(
    run_dir: str,
    specs: list[DatasetSpec],
    loaded: dict[Preprocessing, list[ImageDataset]],
    limit: int | None,
    split: str,
    device,
) -> Matrix:
    other_model, other_run = load_run_model(run_dir)
    other_model.to(device, memory_format=torch.channels_last)
    if other_run.preprocessing not in loaded:  # the other model sees the data at its own input definition
        loaded[other_run.preprocessing] = [load_dataset(spec, other_run.preprocessing, limit) for spec in specs]
    return score_matrix(other_model, other_run, loaded[other_run.preprocessing], split, device)


def format_matrix(matrix: Matrix, title: str) -> str:
    width = max([len(h) for h in matrix.heads] + [len("head")]) + 2
    cols = [max(len(d), 7) + 2 for d in matrix.datasets]
    lines = [title, "head".ljust(width) + "".join(d.rjust(c) for d, c in zip(matrix.datasets, cols))]
    for head in matrix.heads:
        row = head.ljust(width)
        for d, c in zip(matrix.datasets, cols):
            cell = matrix.cells[head].get(d)
            text = "-" if cell is None else f"{cell.accuracy:.4f}" + ("*" if cell.own else "")
            row += text.rjust(c)
        lines.append(row)
    lines.append("(* = the head was trained on that dataset; - = no shared class names)")
    return "\n".join(lines)
