"""Memory of one training step per backbone and image size, as `--batch-size auto` measures it: one forward and
backward pass of the real model at 8 and 16 images on the CPU, resident memory sampled every millisecond
(transferkit/training/memory.py). Prints a table and writes docs/train_memory.md with the command and commit.

    python benchmarks/train_memory.py [--backbones mobilenet_v2,resnet18,efficientnet_b0,convnext_tiny]
        [--sizes 32,64,128,224] [--out docs/train_memory.md]

Weights "none": memory does not depend on the weights' values, and no download is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from provenance import command_line, commit, write_report  # noqa: E402

from transferkit.machine import Machine  # noqa: E402
from transferkit.model import MultiHeadModel, create_backbone  # noqa: E402
from transferkit.training.memory import measure  # noqa: E402

BUDGETS_GB = (4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", default="mobilenet_v2,resnet18,efficientnet_b0,convnext_tiny")
    ap.add_argument("--sizes", default="32,64,128,224")
    ap.add_argument("--out", default=str(ROOT / "docs" / "train_memory.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name in args.backbones.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            backbone = create_backbone(name, "none")
            model = MultiHeadModel(backbone, {"head": [str(i) for i in range(10)]}, size)
            model.to(memory_format=torch.channels_last)
            estimate = measure(model, size, 0)
            picks = [
                estimate.__class__(estimate.fixed_bytes, estimate.per_image_bytes, gb * 2**30).choose()
                for gb in BUDGETS_GB
            ]
            row = (name, size, estimate.per_image_bytes / 2**20, estimate.step_bytes(128) / 2**30, picks)
            rows.append(row)
            print(f"{name} {size}px: {row[2]:.1f} MB/image, batch 128 {row[3]:.2f} GB, auto {picks}", flush=True)
            del model, backbone
    command = command_line()
    lines = [
        "# Memory of a training step, by backbone and image size (CPU)",
        "",
        f"Command: `{command.strip()}` at commit {commit()}. Machine: {Machine.this().describe()}.",
        "",
        "One forward and backward pass of the model (`--weights none`, one head of 10 classes, channels_last) at 8 "
        "and 16 images, resident memory sampled every millisecond, as `--batch-size auto` measures it at the start "
        "of training (freed memory handed back to the system before each probe, so the growth is the step's own). "
        "The data held in memory comes on top (`--max-in-memory-gb`).",
        "",
        "| backbone | image size | MB per image | batch 128 | auto batch at "
        + " / ".join(f"{gb} GB" for gb in BUDGETS_GB)
        + " |",
        "|---|---|---|---|---|",
        *(f"| {n} | {s} px | {mb:.1f} | {gb:.1f} GB | {' / '.join(map(str, p))} |" for n, s, mb, gb, p in rows),
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
