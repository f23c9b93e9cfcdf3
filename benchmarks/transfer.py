"""Transfer-learning results on the built-in offline data; writes docs/results.md (sections a-d),
docs/adaptation.md (section e) and docs/distill.md (section f).

    python benchmarks/transfer.py [--device auto] [--image-size 48] [--limit 10000] [--epochs 3]
    python benchmarks/transfer.py --sections e --seeds 0,1,2 --image-size 32 --limit 2000 --epochs 4
    python benchmarks/transfer.py --sections f    (benchmarks/distill.py with its defaults; run it for its options)

a. MNIST -> sklearn digits: source-only (MNIST labels, head scored on digits), pseudo-labelled
   (`--unlabeled digits`), target-supervised (digits labels too); the share of the gap closed by pseudo-labels.
b. Multi-task (MNIST + Fashion-MNIST, one backbone) against single-task runs.
c. ImageNet-pretrained against random init with few labels (500 Fashion-MNIST images).
d. Sequential transfer (`--init` from the MNIST run onto digits) against starting from ImageNet.
e. Ablation of the `--unlabeled` recipe on MNIST -> digits over several seeds (benchmarks/transfer_adaptation.py).
f. Distillation: two teachers (MobileNetV2 at 64 px, one per dataset) into one student (at 32 and 48 px), against the same
   student trained without teachers (plain multi-task); accuracy per dataset, size and latency ratios
   (benchmarks/distill.py, which takes its own --limit/--epochs; --device and --seed are passed on).
Sections a-d share runs and always run together; e and f run alone or after them.
Every number comes from a run this script performs; settings and seeds are written beside the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from provenance import commit, write_report, write_section
from timed_run import run

from transferkit.config import TrainConfig
from transferkit.evaluation.matrix import evaluate_matrices
from transferkit.runs import load_run


def score(run_dir: Path, head: str, dataset: str, extra: list[str] | None = None) -> float:
    matrix, _ = evaluate_matrices(load_run(run_dir), extra, "test")
    return matrix.cells[head][dataset].accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--limit", type=int, default=10000, help="images per split per dataset")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--few-epochs", type=int, default=15, help="epochs for the 500-image and digits runs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default="runs/bench-transfer")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--sections", default="a,b,c,d", help="a,b,c,d (together), e and/or f")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of section e")
    ap.add_argument(
        "--arms",
        default=None,
        help="section e: rerun only these arms (comma-separated keys of "
        "transfer_adaptation.ARMS), keeping the others from ROOT/section_e.json",
    )
    ap.add_argument("--adaptation-out", default="docs/adaptation.md", help="where section e is written")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    if sections - set("abcdef"):
        ap.error(f"unknown sections {sorted(sections - set('abcdef'))}; use a,b,c,d, e and/or f")
    if sections & set("abcd"):
        sections_a_to_d(args)
    if "e" in sections:
        section_e(args)
    if "f" in sections:
        import distill

        distill.main(["--device", args.device, "--seed", str(args.seed)], command=" ".join(["python", *sys.argv]))


def section_e(args) -> None:
    import torch
    from transfer_adaptation import ARMS, BEGIN, END, run_section_e, section_e_markdown

    base = TrainConfig(
        data=["mnist"],
        image_size=args.image_size,
        limit=args.limit,
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
    )
    seeds = [int(s) for s in args.seeds.split(",")]
    measured = commit()  # the code the runs use, not whatever is checked out when they end
    saved = Path(args.root) / "section_e.json"
    arms = args.arms.split(",") if args.arms else None
    if arms and not saved.is_file():
        raise SystemExit(
            f"--arms keeps the other arms from {saved}, which does not exist: run section e without --arms"
        )
    previous = json.loads(saved.read_text()) if arms else None
    same = dict(
        image_size=args.image_size, limit=args.limit, epochs=args.epochs, batch_size=args.batch_size, seeds=seeds
    )  # the arms kept from before must have been measured the same way
    if previous is not None and previous.get("settings") != same:
        raise SystemExit(f"{saved} was measured with {previous.get('settings')}, not {same}: rerun every arm")
    unknown = set(arms or []) - {key for key, _, _ in ARMS}
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; section e has {', '.join(key for key, _, _ in ARMS)}")
    t0 = time.perf_counter()
    data = run_section_e(base, Path(args.root), seeds, measured, arms, previous)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    digits = "/".join(str(min(n, args.limit)) for n in (1257, 270, 270))
    settings = (
        f"MobileNetV2 (ImageNet), {args.image_size} px, limit {args.limit} images per split per dataset "
        f"(digits train/val/test: {digits}), {args.epochs} epochs (rounds after the first: "
        f"{base.round_epochs}), "
        f"batch {args.batch_size}, AdamW lr {base.lr} warm-up+cosine, pseudo-label threshold "
        f"{base.pseudo_threshold}; device {device} with {torch.get_num_threads()} threads; "
        f"{'whole section' if arms is None else 'the arms this command ran'} "
        f"{(time.perf_counter() - t0) / 60:.0f} min"
    )
    import os

    env = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ]
    command = " ".join([*env, "python", *sys.argv])
    data["commands"] = (previous or {}).get("commands", []) + [f"`{command}` at commit {measured}"]
    block = section_e_markdown(data, settings)
    out = Path(args.adaptation_out)
    write_section(out, block, BEGIN, END, new_file="# Adapting to unlabeled target images\n\n")
    saved.write_text(json.dumps({**data, "settings": same}, indent=1))
    print(block)
    print(f"wrote {out}")


def sections_a_to_d(args) -> None:
    root = Path(args.root)
    base = TrainConfig(
        data=["mnist"],
        image_size=args.image_size,
        limit=args.limit,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
    )
    few = dict(epochs=args.few_epochs, batch_size=min(args.batch_size, 64))
    measured = commit()  # the code the runs use, not whatever is checked out when they end
    t0 = time.perf_counter()

    # a. MNIST -> digits
    src = run("a-source-mnist", base, root)
    a_source = score(src, "mnist", "digits", ["digits"])
    a_mnist = score(src, "mnist", "mnist")
    pseudo = run("a-pseudo", base, root, unlabeled=["digits"])
    a_pseudo = score(pseudo, "mnist", "digits")
    pseudo_stats = json.loads((pseudo / "metrics.json").read_text())["history"][-1]
    target = run("a-target", base, root, data=["mnist", "digits"])
    a_target = score(target, "mnist", "digits")
    gap = (a_pseudo - a_source) / (a_target - a_source) if a_target > a_source else float("nan")

    # b. multi-task vs single-task
    multi = run("b-multi", base, root, data=["mnist", "fashion-mnist"])
    b_multi = {d: score(multi, d, d) for d in ("mnist", "fashion-mnist")}
    single_f = run("b-single-fashion", base, root, data=["fashion-mnist"])
    b_single = {"mnist": a_mnist, "fashion-mnist": score(single_f, "fashion-mnist", "fashion-mnist")}

    # c. pretrained vs random init, 500 labelled Fashion-MNIST images
    c_runs = {}
    for weights in ("imagenet", "none"):
        d = run(
            f"c-fashion500-{weights}",
            base,
            root,
            data=["fashion-mnist"],
            limit=500,
            weights=weights,
            lr=1e-3 if weights == "imagenet" else 3e-3,
            **few,
        )
        c_runs[weights] = score(d, "fashion-mnist", "fashion-mnist")

    # d. sequential transfer onto digits
    seq = run("d-digits-init-mnist", base, root, data=["digits"], init=str(src), **few)
    scratch = run("d-digits-imagenet", base, root, data=["digits"], **few)
    d_seq, d_imagenet = score(seq, "digits", "digits"), score(scratch, "digits", "digits")
    total = time.perf_counter() - t0

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    settings = (
        f"MobileNetV2 ({'ImageNet' if base.weights == 'imagenet' else base.weights}), {args.image_size}px, "
        f"limit {args.limit} images per split, {args.epochs} epochs (few-label and digits runs: "
        f"{args.few_epochs} epochs, batch {few['batch_size']}), batch {args.batch_size}, seed {args.seed}, "
        f"AdamW lr 1e-3 (random init: 3e-3) warm-up+cosine, pseudo-label threshold {base.pseudo_threshold}; device {device}; "
        f"all runs {total / 60:.1f} min"
    )
    lines = [
        "# Transfer-learning results",
        "",
        f"Produced by `{' '.join(['python', *sys.argv])}` at commit {measured} on "
        f"{datetime.now(timezone.utc):%Y-%m-%d}. Test-split accuracy.",
        f"Settings: {settings}.",
        "",
        "## a. MNIST -> sklearn digits (the digits labels are used only by the target-supervised run)",
        "",
        "| run | MNIST head on digits |",
        "|---|---|",
        f"| source-only (train on MNIST) | {a_source:.4f} |",
        f"| pseudo-labelled (`--unlabeled digits`) | {a_pseudo:.4f} |",
        f"| target-supervised (MNIST + digits labels) | {a_target:.4f} |",
        f"| **gap closed by pseudo-labels** | **{'n/a (no gap)' if gap != gap else f'{gap:.1%}'}** (goal >= 50%) |",
        "",
        f"Pseudo-labels in the last epoch: {pseudo_stats['pseudo_coverage']:.1%} of digits images kept, "
        f"{pseudo_stats['pseudo_accuracy']:.1%} of those right (true labels used only for this report).",
        "",
        "## b. Multi-task (one backbone, two heads) vs single-task",
        "",
        "| dataset | single-task | multi-task | difference (points) |",
        "|---|---|---|---|",
    ]
    for d in ("mnist", "fashion-mnist"):
        lines.append(f"| {d} | {b_single[d]:.4f} | {b_multi[d]:.4f} | {100 * (b_multi[d] - b_single[d]):+.2f} |")
    lines += [
        "",
        "Goal: multi-task within 1 point of single-task on each dataset.",
        "",
        "## c. Few labels: 500 Fashion-MNIST images per split",
        "",
        "| init | Fashion-MNIST test accuracy |",
        "|---|---|",
        f"| ImageNet-pretrained | {c_runs['imagenet']:.4f} |",
        f"| random init | {c_runs['none']:.4f} |",
        f"| **margin** | **{100 * (c_runs['imagenet'] - c_runs['none']):+.2f} points** |",
        "",
        "## d. Sequential transfer onto sklearn digits",
        "",
        "| start from | digits test accuracy |",
        "|---|---|",
        f"| the MNIST run (`--init`, backbone + all 10 head rows reused) | {d_seq:.4f} |",
        f"| ImageNet weights | {d_imagenet:.4f} |",
        "",
        "## e, f",
        "",
        "The `--unlabeled` recipe's ablation over three seeds (section e) is in docs/adaptation.md, distillation "
        "(section f) in docs/distill.md; each records its own command.",
        "",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
