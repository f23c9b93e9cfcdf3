"""How often the export gate refuses an artifact as accurate as PyTorch, and how often it passes a worse one:
the paired bound it uses (evaluation/paired.py) beside the two-sided rule it replaced; writes docs/gate_noise.md.

    python benchmarks/gate_noise.py [--run RUN] [--draws 4000]

Part 1, the statistic alone: samples of n images drawn from a candidate whose images are lost and gained at
known rates (the four cells of the paired table, multinomial), `--draws` times per cell of the table.
Part 2, a real model against itself: the fp32 PyTorch logits of RUN (default: a 32 px MNIST + Fashion-MNIST run
trained here on first use) on every test image, and the same logits with Gaussian noise of known size added,
which makes the "artifact" disagree on some images while its accuracy over the whole split moves by a measured
amount; subsets of n test images are drawn without replacement and judged as the gate judges, per dataset.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from provenance import command_line, commit, write_report  # noqa: E402

from transferkit.evaluation.paired import upper_bound  # noqa: E402
from transferkit.machine import Machine  # noqa: E402

SIZES = (256, 600, 1000, 2700, 10000)
TOLERANCE, CONFIDENCE = 1.0, 0.95
OLD_DELTA, OLD_AGREEMENT = 1.0, 0.97  # the rule before: |delta| <= 1 point and agreement >= 97%


def judged(lost: np.ndarray, gained: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(passes the paired bound, passes the old two-sided rule) for arrays of cell counts."""
    new = np.array([upper_bound(int(c), int(b), n, CONFIDENCE) <= TOLERANCE for c, b in zip(lost, gained)])
    old = (np.abs(100.0 * (lost - gained) / n) <= OLD_DELTA) & ((lost + gained) / n <= 1 - OLD_AGREEMENT)
    return new, old


def simulated(draws: int) -> list[str]:
    rng = np.random.default_rng(0)
    cases = [  # (true drop in points, share of images disagreeing)
        (0.0, 0.005),
        (0.0, 0.01),
        (0.0, 0.02),
        (0.0, 0.04),
        (-1.0, 0.03),
        (1.0, 0.02),
        (1.0, 0.04),
        (2.0, 0.04),
    ]
    lines = [
        "| true drop | disagreeing | " + " | ".join(f"n={n}" for n in SIZES) + " |",
        "|---:|---:|" + "---:|" * len(SIZES),
    ]
    for drop, q in cases:
        lose, gain = (q + drop / 100) / 2, (q - drop / 100) / 2
        cells = []
        for n in SIZES:
            counts = rng.multinomial(n, [lose, gain, 1 - lose - gain], size=draws)
            new, old = judged(counts[:, 0], counts[:, 1], n)
            cells.append(f"{new.mean():.1%} ({old.mean():.1%})")
        lines.append(f"| {drop:+.1f} | {q:.1%} | " + " | ".join(cells) + " |")
    return lines


def trained_run(path: Path) -> Path:
    if not (path / "model.pt").is_file():
        cmd = [sys.executable, "-m", "transferkit", "train", "--data", "mnist,fashion-mnist", "--limit", "3000"]
        subprocess.run([*cmd, "--epochs", "2", "--image-size", "32", "--out", str(path)], check=True, cwd=ROOT)
    return path


def real_model(run_dir: Path, draws: int) -> tuple[list[str], str]:
    from transferkit.export import verify
    from transferkit.model import ExportModule
    from transferkit.runs import load_run_model

    model, run = load_run_model(run_dir)
    inputs = verify.load_verify_inputs(run, 10_000)
    heads = list(model.head_names)
    logits = verify.pytorch_logits(ExportModule(model).eval(), inputs.batch, heads)
    rng = np.random.default_rng(1)
    lines = [
        "| dataset | noise (x logit std) | disagreeing | drop on all | "
        + " | ".join(f"n={n}" for n in SIZES if n < 10_000)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * (len(SIZES) - 1),
    ]
    for head, rows in inputs.rows.items():
        ref, y = logits[head][rows], inputs.labels[head]
        for scale in (0.05, 0.1, 0.2):
            noisy = ref + rng.normal(0, scale * ref.std(), ref.shape).astype(np.float32)
            ref_right, got_right = ref.argmax(1) == y, noisy.argmax(1) == y
            disagreeing = float((ref.argmax(1) != noisy.argmax(1)).mean())
            drop_all = 100.0 * (ref_right.mean() - got_right.mean())
            cells = []
            for n in SIZES:
                if n >= len(y):
                    continue
                picks = np.stack([rng.choice(len(y), n, replace=False) for _ in range(draws // 4)])
                lost = (ref_right[picks] & ~got_right[picks]).sum(1)
                gained = (~ref_right[picks] & got_right[picks]).sum(1)
                new, old = judged(lost, gained, n)
                cells.append(f"{new.mean():.1%} ({old.mean():.1%})")
            lines.append(f"| {head} | {scale:g} | {disagreeing:.1%} | {drop_all:+.2f} | " + " | ".join(cells) + " |")
    return lines, f"{len(inputs.batch)} test images, {', '.join(f'{h}: {len(r)}' for h, r in inputs.rows.items())}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "gate-noise")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "gate_noise.md")
    args = parser.parse_args()
    machine = Machine.this()
    real, described = real_model(trained_run(args.run), args.draws)
    lines = [
        "# How often the gate passes an artifact",
        "",
        f"Command: `{command_line()}` at commit {commit()}, on {machine.describe()}.",
        "",
        f"Each cell: the share of samples that **pass** with the paired bound the gate uses (drop's one-sided "
        f"{CONFIDENCE:.0%} Agresti-Min bound <= {TOLERANCE:g} point), and in brackets with the rule it replaced "
        f"(|accuracy delta| <= {OLD_DELTA:g} point and top-1 agreement >= {OLD_AGREEMENT:.0%}). A good gate passes "
        "rows with a true drop of 0 or less nearly always, and a true drop of 1 point or more at most 5% of the "
        "time.",
        "",
        f"## 1. The statistic: {args.draws} simulated samples per cell",
        "",
        *simulated(args.draws),
        "",
        f"## 2. A real model against itself with noise of known size ({described})",
        "",
        "The fp32 PyTorch logits of the run, and the same logits plus Gaussian noise: the 'artifact' disagrees on "
        "the share of images shown and its accuracy over the whole test split moves by `drop on all`. "
        f"{args.draws // 4} subsets of n test images per cell.",
        "",
        *real,
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
