"""A distilled run beside its teachers (`transferkit eval` of a run made with --teachers).

Two tables: accuracy on every dataset (the student's head for it beside each teacher's), and what each
model costs to serve: parameters, model.pt size and CPU latency at batch 32. Latency is measured in this
process, round-robin over the models (one call of each per round, median over rounds:
`machine.interleaved_medians`), so a machine busy with other work slows every model alike instead of
whichever happened to run during the busy spell.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from transferkit.evaluation.matrix import Matrix
from transferkit.machine import interleaved_medians
from transferkit.runs import Run, load_run_model

LATENCY_BATCH = 32


@dataclass
class ModelCost:
    name: str  # "student" or the teacher's run folder
    run: str
    image_size: int
    params: int
    model_bytes: int  # size of model.pt
    latency_ms: float  # median per call of LATENCY_BATCH images, CPU

    def to_dict(self) -> dict:
        return asdict(self)


def dataset_cell(matrix: Matrix, dataset: str):
    """The head a model would answer `dataset` with: the one trained on it, else the one scoring the largest
    share of its images (a teacher trained on sklearn digits answers MNIST with its digits head)."""
    cells = [(head, row[dataset]) for head, row in matrix.cells.items() if dataset in row]
    if not cells:
        return None, None
    return max(cells, key=lambda hc: (hc[1].own, hc[1].coverage))


def format_side_by_side(student: Matrix, teachers: dict[str, Matrix | None], split: str) -> str:
    header = ["dataset", "student"] + [f"teacher {Path(t).name}" for t in teachers]
    rows = []
    for d in student.datasets:
        row = [d]
        for matrix in [student, *teachers.values()]:
            head, cell = dataset_cell(matrix, d) if matrix is not None else (None, None)
            row.append(
                "run gone"
                if matrix is None
                else "-"
                if cell is None
                else f"{cell.accuracy:.4f}{'*' if cell.own else ''} ({head})"
            )
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) + 2 for i in range(len(header))]
    lines = [f"student beside its teachers on the {split} split (each model's head for the dataset; * = trained on it)"]
    for r in [header, *rows]:
        lines.append(r[0].ljust(widths[0]) + "".join(text.rjust(w) for text, w in zip(r[1:], widths[1:])))
    return "\n".join(lines)


def measure_latencies(models: list[torch.nn.Module], sizes: list[int], rounds: int, warmup: int = 2) -> list[float]:
    """Median ms per call of LATENCY_BATCH images on the CPU, each model at its own input size."""
    inputs = [torch.randn(LATENCY_BATCH, 3, s, s).contiguous(memory_format=torch.channels_last) for s in sizes]
    calls = [lambda m=model, x=x: m(x) for model, x in zip(models, inputs)]
    with torch.inference_mode():
        seconds = interleaved_medians(calls, rounds, warmup)
    return [s * 1000.0 for s in seconds]


def measure_costs(run: Run, rounds: int = 10) -> list[ModelCost]:
    """Student and every teacher that still exists: parameters, model.pt bytes, median CPU latency."""
    dirs = [("student", run.dir)] + [
        (f"teacher {Path(t).name}", Path(t)) for t in run.config.teachers if Path(t).is_dir()
    ]
    models, runs = [], []
    for _, d in dirs:
        model, r = load_run_model(d)  # on the CPU
        models.append(model.to(memory_format=torch.channels_last))
        runs.append(r)
    sizes = [r.preprocessing.image_size for r in runs]
    latency = measure_latencies(models, sizes, rounds)
    return [
        ModelCost(name, str(d), size, sum(p.numel() for p in m.parameters()), (d / "model.pt").stat().st_size, ms)
        for (name, d), m, size, ms in zip(dirs, models, sizes, latency)
    ]


def format_costs(costs: list[ModelCost]) -> str:
    student, teachers = costs[0], costs[1:]
    rows = [(c.name, c.image_size, c.params, c.model_bytes, c.latency_ms) for c in costs]
    if len(teachers) > 1:
        rows.append(
            (
                "teachers together",
                0,
                sum(c.params for c in teachers),
                sum(c.model_bytes for c in teachers),
                sum(c.latency_ms for c in teachers),
            )
        )
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"cost to serve (CPU, {torch.get_num_threads()} threads, median ms per batch of {LATENCY_BATCH}; "
        "ratios: this row / student)",
        "model".ljust(width)
        + "input".rjust(7)
        + "params".rjust(12)
        + "model.pt".rjust(11)
        + "ms b=32".rjust(10)
        + "params x".rjust(10)
        + "size x".rjust(8)
        + "latency x".rjust(11),
    ]
    for name, size, params, nbytes, ms in rows:
        lines.append(
            name.ljust(width)
            + (f"{size}px" if size else "").rjust(7)
            + f"{params / 1e6:.2f}M".rjust(12)
            + f"{nbytes / 2**20:.1f} MiB".rjust(11)
            + f"{ms:.1f}".rjust(10)
            + f"{params / student.params:.2f}".rjust(10)
            + f"{nbytes / student.model_bytes:.2f}".rjust(8)
            + f"{ms / student.latency_ms:.2f}".rjust(11)
        )
    if teachers:
        summed = sum(c.latency_ms for c in teachers)
        lines.append(f"student latency / teachers' summed latency: {student.latency_ms / summed:.2f}")
    return "\n".join(lines)
