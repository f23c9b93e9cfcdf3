"""The hardening comparison of benchmarks/robustness.py: training recipes side by side against a baseline run, and
every exported artifact (fp32, INT8) scored on the very corrupted images PyTorch was scored on.

    cells, skipped = artifact_corruptions(run_dir, options)   # artifact -> dataset -> head -> CorruptionCell
    fgsm = fgsm_attack(run_dir, "2/255", images=1000)          # dataset -> head -> AttackCell (PyTorch, artifacts)
    lines = hardening_section(runs, results, baseline, ...)     # Markdown

Nothing here is new arithmetic: the images come from evaluation/corruption_eval.py's seeded subset and
evaluation/corruptions.py's corrupt_batches (the same seed, batches and draws as `transferkit eval --corruptions`),
the artifacts run through the serving runtimes as `transferkit eval --attack` runs them, and FGSM is
evaluation/attacks.py's, called without rewriting the run's eval.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from transferkit.evaluation.corruption_eval import CorruptionCell, seeded_subset
from transferkit.evaluation.robust_options import CORRUPTION_FAMILIES, RobustnessOptions
from transferkit.evaluation.robustness import RobustnessResult, eps_text
from transferkit.runs import load_run

# The families a recipe's training draws corruptions of its own from (TrainConfig.augment -> families): robust's
# training-only noise is of the noise family, though none of its corruptions (training/robust_augment.py).
TRAINED_FAMILIES = {"default": (), "none": (), "robust": ("noise",)}
# the INT8 goal: corruption accuracy within this many points of the fp32 artifact, else reported as not robust
INT8_TOLERANCE_POINTS = 1.0


def _evaluation(run_dir: Path, split: str):
    from transferkit.evaluation.matrix import evaluate_all

    run = load_run(run_dir)
    return run, evaluate_all(run, None, split, teachers=False)


def _predicted(runtimes: dict, pre, batches, heads: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """artifact -> head -> predicted class per image, over `batches` of uint8 (B,3,S,S) tensors."""
    parts: dict[str, list] = {name: [] for name in runtimes}
    for batch in batches:
        normalised = pre.normalize_numpy(np.ascontiguousarray(batch.permute(0, 2, 3, 1).cpu().numpy()))
        for name, runtime in runtimes.items():
            parts[name].append({h: v.argmax(1) for h, v in runtime.run(normalised).items()})
    return {name: {h: np.concatenate([p[h] for p in ps]) for h in heads} for name, ps in parts.items()}


def _accuracy(hits: np.ndarray, target: np.ndarray) -> float:
    """Over the images whose class the head has (target -1: not in the head)."""
    keep = target >= 0
    return float((hits[keep] == target[keep]).mean())


def artifact_corruptions(
    run_dir: Path, options: RobustnessOptions, split: str = "test"
) -> tuple[dict[str, dict[str, dict[str, CorruptionCell]]], dict[str, str]]:
    """Every servable artifact of the run's export on the clean and corrupted images `transferkit eval
    --corruptions` scores PyTorch on -> (artifact -> dataset -> head -> cell, artifact -> why it was skipped)."""
    import torch

    from transferkit.evaluation.attacks import exported_runtimes
    from transferkit.evaluation.corruptions import corrupt_batches
    from transferkit.evaluation.matrix import head_targets

    run, evaluation = _evaluation(run_dir, split)
    runtimes, skipped = exported_runtimes(run, failed_gate=True)
    cells: dict[str, dict[str, dict[str, CorruptionCell]]] = {name: {} for name in runtimes}
    for ds in evaluation.datasets:
        pixels, labels = seeded_subset(ds, split, options)
        targets = head_targets(run, ds, labels)
        heads = list(targets)
        clean_batch = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
        for name, hits in _predicted(runtimes, run.preprocessing, [clean_batch], heads).items():
            cells[name][ds.name] = {
                h: CorruptionCell(int((t >= 0).sum()), run.labels.datasets.get(ds.name) == h, _accuracy(hits[h], t))
                for h, t in targets.items()
            }
        for corruption in options.corruption_names:
            for severity in options.severity_levels:
                batches = corrupt_batches(pixels, corruption, severity, options.robust_seed, evaluation.device)
                for name, hits in _predicted(runtimes, run.preprocessing, batches, heads).items():
                    for head, cell in cells[name][ds.name].items():
                        cell.accuracy.setdefault(corruption, {})[severity] = _accuracy(hits[head], targets[head])
    return cells, skipped


def fgsm_attack(run_dir: Path, eps: str, images: int, seed: int = 0, split: str = "test"):
    """FGSM at `eps` on PyTorch and (the same uint8 images) every servable artifact -> dataset -> head ->
    AttackCell, as `transferkit eval --attack fgsm --eps EPS` computes it."""
    from transferkit.evaluation.attacks import exported_runtimes, score_attacks

    run, evaluation = _evaluation(run_dir, split)
    runtimes, _ = exported_runtimes(run, failed_gate=True)
    options = RobustnessOptions(attack="fgsm", eps=eps, robust_images=images, robust_seed=seed)
    return score_attacks(evaluation.model, run, evaluation.datasets, split, options, evaluation.device, runtimes)


def _family_mca(cell: CorruptionCell, families: tuple[str, ...]) -> float:
    names = [c for f in families for c in CORRUPTION_FAMILIES[f] if c in cell.accuracy]
    return statistics.fmean(a for c in names for a in cell.accuracy[c].values()) if names else float("nan")


def _own(cells: dict[str, dict[str, object]]) -> dict[str, object]:
    """dataset -> the cell of the head trained on it."""
    return {d: c for d, row in cells.items() for c in row.values() if getattr(c, "own", False)}


def _split_accuracy(run_dir: Path) -> dict[str, tuple[float, int]]:
    """dataset -> (accuracy of the head trained on it over the whole evaluated split, images), from eval.json:
    the clean cost is read there, on ten times the images of the corruption subset."""
    matrix = json.loads((run_dir / "eval.json").read_text())["matrix"]
    return {d: (c["accuracy"], c["n"]) for row in matrix.values() for d, c in row.items() if c["own"]}


def _points(value: float) -> str:
    """A difference of accuracies in points, to two decimals: a goal of +5 or -1 point is read off it."""
    return f"{100 * value:+.2f}"


def hardening_section(
    runs: dict[str, Path],
    results: dict[str, RobustnessResult],
    baseline: str,
    fgsm: dict[str, dict],
    fgsm_eps: str,
    artifacts: dict[str, tuple],
) -> list[str]:
    """Markdown: each run against `baseline` per dataset (clean, mCA, mCA over the families its training never
    draws from, FGSM, PGD at the same eps where the evaluation ran it), then fp32 against INT8 artifacts."""
    base = _own(results[baseline].corruptions.cells)
    base_clean = _split_accuracy(runs[baseline])
    eps_value = RobustnessOptions(attack="fgsm", eps=fgsm_eps).eps_values[0]
    lines = [
        "| run | dataset | clean (images) | Δ clean | mCA | Δ mCA | untouched families | mCA there | Δ there | "
        f"FGSM {fgsm_eps} | PGD {fgsm_eps} |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for name, run_dir in runs.items():
        augment = load_run(run_dir).config.augment
        scored = next(iter(base.values())).accuracy
        untouched = tuple(
            f
            for f, names in CORRUPTION_FAMILIES.items()
            if f not in TRAINED_FAMILIES.get(augment, ()) and any(c in scored for c in names)
        )
        attacks = _own(results[name].attacks or {})
        clean = _split_accuracy(run_dir)
        for dataset, cell in _own(results[name].corruptions.cells).items():
            ref = base[dataset]
            there, ref_there = _family_mca(cell, untouched), _family_mca(ref, untouched)
            pgd = attacks.get(dataset)
            pgd_text = f"{pgd.pytorch[eps_value]:.4f}" if pgd is not None and eps_value in pgd.pytorch else "-"
            attacked = _own(fgsm.get(name, {})).get(dataset)
            fgsm_text = f"{attacked.pytorch[eps_value]:.4f}" if attacked is not None else "-"
            (accuracy, images), ref_accuracy = clean[dataset], base_clean[dataset][0]
            lines.append(
                f"| {name} | {dataset} | {accuracy:.4f} ({images}) | {_points(accuracy - ref_accuracy)} | {cell.mca:.4f} | "
                f"{_points(cell.mca - ref.mca)} | {', '.join(untouched)} | {there:.4f} | {_points(there - ref_there)} | "
                f"{fgsm_text} | {pgd_text} |"
            )
    lines += ["", *_artifact_rows(runs, results, artifacts, fgsm, eps_value)]
    return lines


def _gate_failed(run_dir: Path) -> set[str]:
    """The run's artifacts that exported but failed the clean accuracy gate: scored here, never served."""
    from transferkit.artifact import VERIFY_FAILED
    from transferkit.manifest import read_manifest

    manifest = read_manifest(run_dir / "export")
    return {name for name, entry in manifest.artifacts.items() if entry.status == VERIFY_FAILED}


def _artifact_rows(
    runs: dict[str, Path], results: dict[str, RobustnessResult], artifacts: dict[str, tuple], fgsm: dict, eps: float
):
    """`artifacts`: run -> (artifact -> dataset -> head -> cell, artifact -> why it was not scored)."""
    if not artifacts:
        return []
    lines = [
        f"Exported artifacts on the same images (clean, all {len(next(iter(results.values())).corruptions.corruptions)} "
        f"corruptions at every severity, FGSM {eps_text(eps)} rounded to uint8). `Δ vs fp32`: the artifact's mCA "
        f"minus the fp32 ONNX artifact's, in points; beyond {INT8_TOLERANCE_POINTS:g} point the artifact is "
        "reported as not robust. An artifact that failed the export's clean accuracy gate is never served; it is "
        "scored here all the same, and its verdict says so.",
        "",
        "| run | artifact | dataset | clean | mCA | Δ vs fp32 | PyTorch mCA | FGSM (uint8) | verdict |",
        "|---|---|---|--:|--:|--:|--:|--:|---|",
    ]
    for name, (by_artifact, skipped) in artifacts.items():
        lines += [
            f"| {name} | {artifact} | - | - | - | - | - | - | not scored: {why} |" for artifact, why in skipped.items()
        ]
        torch_cells = _own(results[name].corruptions.cells)
        fp32 = _own(by_artifact.get("onnx", {}))
        attacked = _own(fgsm.get(name, {}))
        failed = _gate_failed(runs[name]) if by_artifact else set()
        for artifact, cells in by_artifact.items():
            for dataset, cell in _own(cells).items():
                delta = 100 * (cell.mca - fp32[dataset].mca) if dataset in fp32 else float("nan")
                verdict = (
                    "fp32 reference"
                    if artifact == "onnx"
                    else ("within tolerance" if delta >= -INT8_TOLERANCE_POINTS else "not robust")
                )
                if artifact in failed:
                    verdict += "; failed the clean gate, not served"
                adv = attacked.get(dataset)
                adv_text = (
                    f"{adv.artifacts[artifact][eps]:.4f}" if adv is not None and artifact in adv.artifacts else "-"
                )
                lines.append(
                    f"| {name} | {artifact} | {dataset} | {cell.clean:.4f} | {cell.mca:.4f} | {delta:+.2f} | "
                    f"{torch_cells[dataset].mca:.4f} | {adv_text} | {verdict} |"
                )
    return lines
