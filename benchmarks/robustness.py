"""Robustness of trained runs under the common corruptions and white-box attacks; writes docs/robustness.md.

    python benchmarks/robustness.py --runs runs/a,runs/b [--reference runs/source] [--corruptions all]
        [--attack pgd] [--eps 1/255,2/255,4/255] [--pgd-steps 10] [--robust-images 1000] [--out docs/robustness.md]
        [--baseline a --fgsm-eps 2/255 [--artifact-corruptions]]

With --baseline, a Hardening section compares every run with that one (a default-augmentation run, say) on clean
accuracy, mCA, mCA over the corruption families its training never draws from, FGSM and PGD; with
--artifact-corruptions, each run's exported artifacts (fp32, INT8) are scored on the same corrupted images
(benchmarks/robust_compare.py).

Trains nothing: each run is evaluated with `transferkit.evaluate(run, corruptions=..., attack=...)`, exactly what
`transferkit eval RUN --corruptions ... --attack ...` does (so each run's own eval.json and report.md are rewritten
too), and the report gathers the numbers with how each run was made (its config.yaml), the command, the commit
and the machine. A run that has been exported also has its artifacts scored on the adversarial images, and the
gate's corrupted-sample check (RUN/export/verify.json) is quoted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from provenance import command_line, commit, write_report
from robust_compare import artifact_corruptions, fgsm_attack, hardening_section

from transferkit.evaluation.robust_options import CORRUPTION_FAMILIES
from transferkit.evaluation.robustness import QUANTISED_NOTE, RobustnessResult, eps_text
from transferkit.machine import Machine, load_average
from transferkit.runs import load_run


def _made(run_dir: Path) -> str:
    """The training options of a run, as `transferkit train` flags (from its config.yaml)."""
    cfg = load_run(run_dir).config
    flags = [f"--data {','.join(cfg.data)}", f"--backbone {cfg.backbone}", f"--weights {cfg.weights}"]
    flags += [f"--limit {cfg.limit}"] if cfg.limit else []
    flags += [f"--image-size {cfg.image_size}", f"--epochs {cfg.epochs}", f"--batch-size {cfg.batch_size}"]
    flags += [f"--augment {cfg.augment}"] if cfg.augment != "default" else []
    flags += [f"--augment-severity {cfg.augment_severity}"] if cfg.augment == "robust" else []
    flags += [f"--robust-views {cfg.robust_views}"] if cfg.robust_views else []
    flags += [f"--consistency-weight {cfg.consistency_weight:g}"] if cfg.consistency_weight else []
    if cfg.adversarial_training != "none":
        flags += [f"--adversarial-training {cfg.adversarial_training}", f"--adversarial-eps {cfg.adversarial_eps}"]
    return f"`transferkit train {' '.join(flags)} --seed {cfg.seed}`"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def corruption_rows(name: str, result: RobustnessResult) -> list[str]:
    rows = []
    for dataset, row in result.corruptions.cells.items():
        for cell in row.values():
            if not cell.own:
                continue
            _, errors = result.errors(dataset, cell)
            families = [
                sum(cell.mean(c) for c in names if c in cell.accuracy) / max(1, sum(c in cell.accuracy for c in names))
                for names in CORRUPTION_FAMILIES.values()
            ]
            rows.append(
                f"| {name} | {dataset} | {cell.clean:.4f} | {cell.mca:.4f} | "
                f"{_percent(errors and errors['mce'])} | {_percent(errors and errors['relative_mce'])} | "
                + " | ".join(f"{f:.4f}" for f in families)
                + " |"
            )
    return rows


def per_corruption(results: dict[str, RobustnessResult]) -> list[str]:
    """Corruption rows, one column per run and dataset: accuracy averaged over the severities."""
    columns = [
        (name, dataset, cell)
        for name, result in results.items()
        if result.corruptions
        for dataset, row in result.corruptions.cells.items()
        for cell in row.values()
        if cell.own
    ]
    if not columns:
        return []
    lines = [
        "| corruption | " + " | ".join(f"{n} {d}" for n, d, _ in columns) + " |",
        "|---|" + "--:|" * len(columns),
    ]
    for corruption in columns[0][2].accuracy:
        lines.append(f"| {corruption} | " + " | ".join(f"{c.mean(corruption):.4f}" for _, _, c in columns) + " |")
    return lines


def attack_rows(name: str, result: RobustnessResult) -> list[str]:
    rows = []
    for dataset, row in result.attacks.items():
        for cell in row.values():
            if not cell.own:
                continue
            for eps in result.options.eps_values:
                artifacts = ", ".join(f"{a} {cell.artifacts[a][eps]:.4f}" for a in result.artifacts) or "not exported"
                rows.append(
                    f"| {name} | {dataset} | {cell.clean:.4f} | {eps_text(eps)} | {cell.pytorch[eps]:.4f} | "
                    f"{cell.pytorch_uint8[eps]:.4f} | {artifacts} |"
                )
    return rows


def gate_rows(name: str, run_dir: Path) -> list[str]:
    path = run_dir / "export" / "verify.json"
    if not path.is_file():
        return []
    rows = []
    for artifact, report in json.loads(path.read_text())["formats"].items():
        for head, stats in ((report.get("robustness") or {}).get("heads") or {}).items():
            rows.append(
                f"| {name} | {artifact} | {head} | {stats['images']} | {stats['accuracy_pytorch']:.4f} | "
                f"{stats['accuracy_format']:.4f} | {stats['accuracy_delta_points']:+.2f} | {stats['top1_agreement']:.1%} |"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="comma-separated run folders to evaluate")
    ap.add_argument("--reference", default=None, help="run the corruption errors are relative to")
    ap.add_argument("--corruptions", default="all")
    ap.add_argument("--severities", default=None)
    ap.add_argument("--attack", default="pgd", choices=("fgsm", "pgd", "none"))
    ap.add_argument("--eps", default=None)
    ap.add_argument("--pgd-steps", type=int, default=None)
    ap.add_argument("--robust-images", type=int, default=1000)
    ap.add_argument("--out", default="docs/robustness.md")
    ap.add_argument(
        "--baseline", default=None, help="name of the run (folder name) the Hardening section compares with"
    )
    ap.add_argument("--fgsm-eps", default="2/255", help="with --baseline: the FGSM budget of its table")
    ap.add_argument("--artifact-corruptions", action="store_true", help="score exported artifacts on the corruptions")
    args = ap.parse_args()

    import transferkit

    source = commit()  # the code the evaluation runs, not whatever is checked out when it ends
    machine, load_before = Machine.this(), load_average()
    options = {
        "corruptions": args.corruptions,
        "severities": args.severities,
        "reference": args.reference,
        "attack": None if args.attack == "none" else args.attack,
        "eps": args.eps,
        "pgd_steps": args.pgd_steps,
        "robust_images": args.robust_images,
    }
    results: dict[str, RobustnessResult] = {}
    seconds: dict[str, float] = {}
    runs = {Path(r).name: Path(r) for r in args.runs.split(",")}
    for name, run_dir in runs.items():
        start = time.perf_counter()
        results[name] = transferkit.evaluate(run_dir, **options).robustness
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.0f} s", file=sys.stderr)
    first = next(iter(results.values()))
    fgsm, artifacts = {}, {}
    if args.baseline:
        if args.baseline not in runs or not first.corruptions:
            raise SystemExit(f"--baseline {args.baseline}: name one of --runs ({', '.join(runs)}), with --corruptions")
        for name, run_dir in runs.items():
            start = time.perf_counter()
            fgsm[name] = fgsm_attack(run_dir, args.fgsm_eps, args.robust_images)
            if args.artifact_corruptions:
                artifacts[name] = artifact_corruptions(run_dir, results[name].options)
            seconds[name] += time.perf_counter() - start
            print(f"{name}: FGSM and artifacts, {seconds[name]:.0f} s in all", file=sys.stderr)

    lines = [
        "# Robustness: common corruptions and adversarial examples",
        "",
        f"Command: `{command_line()}` at commit {source}. Machine: {machine.describe()}. Load average (1 min): "
        f"{load_before} before, {load_average()} after. Evaluation time per run (everything below "
        f"together): {', '.join(f'{n} {s:.0f} s' for n, s in seconds.items())}.",
        "",
        "| run | how it was made |",
        "|---|---|",
        *(f"| {name} | {_made(run_dir)} |" for name, run_dir in runs.items()),
    ]
    if args.reference:
        lines.append(f"| reference `{Path(args.reference).name}` | {_made(Path(args.reference))} |")
    if args.baseline:
        lines += [
            "",
            "## Hardening",
            "",
            f"Each run against `{args.baseline}` (same data, epochs, batch size and seed), on the head trained on each "
            "dataset. Δ: difference in points. clean: accuracy on the whole test split (the corruption subset's clean "
            "accuracy is in the next section). mCA: all corruptions and severities below. `untouched families`: the "
            "corruption families whose kind the run's training never draws (robust's training-only noise is of the "
            "noise family, none of its corruptions; AugMix's operations belong to no family), and the mCA over them. "
            f"FGSM {args.fgsm_eps}: one signed-gradient step, white-box on PyTorch; PGD: the section below. "
            "What each recipe costs in training speed: docs/train_throughput.md (a run's own img/s depends on what "
            "else the machine ran meanwhile).",
            "",
            *hardening_section(runs, results, args.baseline, fgsm, args.fgsm_eps, artifacts),
        ]
    if first.corruptions:
        lines += [
            "",
            "## Common corruptions",
            "",
            f"Hendrycks & Dietterich's corruptions at CIFAR-10-C's severities {', '.join(map(str, first.corruptions.severities))} "
            f"on a seeded subset of {args.robust_images} test images per dataset, applied to the uint8 pixels the model "
            "sees. mCA: mean accuracy over every corruption and severity. mCE: errors summed over severities, over the "
            "reference's, averaged over corruptions; relative mCE: accuracy lost to each corruption (clean minus "
            "corrupted), over the reference's loss. Below 100% is more robust than the reference. Family columns: mean "
            "accuracy over the family's corruptions and severities. The head trained on each dataset.",
            "",
            "| run | dataset | clean | mCA | mCE | rel. mCE | " + " | ".join(CORRUPTION_FAMILIES) + " |",
            "|---|---|--:|--:|--:|--:|" + "--:|" * len(CORRUPTION_FAMILIES),
            *(row for name, result in results.items() for row in corruption_rows(name, result)),
            "",
            "Relative CE divides what this model loses by what the reference loses: where the reference loses almost "
            "nothing it is large and noisy, and where the reference gains it is not defined (`-` in the runs' reports); "
            "CE, which compares errors, is the steadier headline.",
            "",
            "Accuracy per corruption, averaged over its severities:",
            "",
            *per_corruption(results),
        ]
    if first.attacks is not None:
        steps = (
            f", {first.options.steps} steps of 2.5 eps / steps from a random start"
            if first.options.attack == "pgd"
            else ""
        )
        lines += [
            "",
            "## Adversarial examples",
            "",
            f"{first.options.attack.upper()}, white-box on the PyTorch model, L-infinity eps on the 0..1 pixel scale"
            f"{steps}, each head attacked on its own dataset's images. {QUANTISED_NOTE} The images are crafted on "
            "PyTorch fp32: an artifact that computes slightly differently (INT8) is hit by them as by a transferred "
            "attack, so its higher numbers are not robustness of its own.",
            "",
            "| run | dataset | clean | eps | torch | torch uint8 | exported artifacts (same uint8 images) |",
            "|---|---|--:|--:|--:|--:|---|",
            *(row for name, result in results.items() if result.attacks for row in attack_rows(name, result)),
        ]
    gate = [row for name, run_dir in runs.items() for row in gate_rows(name, run_dir)]
    if gate:
        lines += [
            "",
            "## The export gate's corrupted sample",
            "",
            "From each run's `export/verify.json`: every artifact beside PyTorch fp32 on gaussian noise, gaussian blur "
            "and JPEG at severities 2 and 4 over 32 test images per dataset (`transferkit export` records it for every "
            "artifact; `--robust-tolerance POINTS` makes it a pass/fail bound).",
            "",
            "| run | artifact | head | images | acc torch | acc artifact | delta points | top-1 agreement |",
            "|---|---|---|--:|--:|--:|--:|--:|",
            *gate,
        ]
    write_report(args.out, lines + [""])


if __name__ == "__main__":
    main()
