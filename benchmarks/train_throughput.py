"""Training throughput: the real loop against the same model's synthetic-data ceiling, in one run.

    python benchmarks/train_throughput.py [--device cuda] [--image-size 64] [--batch-size 512] [--steps 50]
        [--augment robust] [--adversarial-training fgsm]

real:      TrainLoop.train_step on MNIST + Fashion-MNIST batches from the multi-dataset sampler (index
           gather from the on-device uint8 pool, on-device augmentation, masked two-head loss, AdamW,
           clipping, EMA when --ema) -- exactly what `transferkit train` runs, with the --augment and
           --adversarial-training given (the command column of the row says which).
synthetic: the same model, optimiser and loss on random tensors already on the device, normalised
           and in channels_last: no data work at all. The ratio real/synthetic says how much the data
           path costs. Both are timed in the same process, alternating, after warm-up; median of rounds.
Prints a table and appends it to docs/train_throughput.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import commit

from transferkit.config import TrainConfig
from transferkit.machine import interleaved_medians
from transferkit.training.distributed import DistInfo, resolve_device
from transferkit.training.losses import masked_head_losses
from transferkit.training.precision import autocast
from transferkit.training.trainer import TrainLoop


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_of(fn, steps: int, device: torch.device):
    """One timed call: `steps` steps of fn, then the device drained, since CUDA runs ahead of Python (each call
    starts on an idle device: the one before it, or the warm-up, ended drained)."""

    def run() -> None:
        for i in range(steps):
            fn(i)
        sync(device)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", type=int, default=20000)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ema", type=float, default=None)
    ap.add_argument("--augment", default="default", help="the training recipe's augmentation (default|robust|none)")
    ap.add_argument("--adversarial-training", default="none", help="none|fgsm: the real step adds the FGSM pass")
    ap.add_argument("--out", default="docs/train_throughput.md")
    args = ap.parse_args()

    device = resolve_device(args.device)
    config = TrainConfig(
        data=["mnist", "fashion-mnist"],
        image_size=args.image_size,
        batch_size=args.batch_size,
        limit=args.limit,
        epochs=1,
        compile=args.compile,
        ema=args.ema,
        augment=args.augment,
        adversarial_training=args.adversarial_training,
        device=str(device),
        checkpoint_every=10**9,
    ).validate()
    loop = TrainLoop(config, Path(tempfile.mkdtemp(prefix="tk-bench-")), DistInfo(), device, resuming=False)
    setup = loop.setup
    model, train_model = loop.model, loop.train_model
    model.train()

    n, s = args.batch_size, args.image_size
    x_syn = torch.randn(n, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    y_syn = torch.randint(0, 10, (n,), device=device)
    h_syn = torch.randint(0, len(setup.head_order), (n,), device=device)

    def synthetic_step(_: int) -> None:
        loop.optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            logits = train_model(x_syn)
        loss, _ = masked_head_losses(logits, y_syn, h_syn, setup.head_order, setup.head_weights, setup.class_weights)
        loss.backward()
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        loop.optimizer.step()
        loop.scheduler.step()
        if loop.ema:
            loop.ema.update(model)

    inputs = loop.step_inputs(0, 0)

    def real_step(_: int) -> None:
        nonlocal inputs
        try:
            batch = next(inputs)
        except StopIteration:  # next pass over the epoch's batches
            inputs = loop.step_inputs(0, 0)
            batch = next(inputs)
        loop.train_step(*batch)

    for fn in (real_step, synthetic_step):  # warm-up: allocator, cuDNN autotune, compilation
        steps_of(fn, 5, device)()
    # alternating, so a busy spell on the machine slows both alike
    timed = [steps_of(real_step, args.steps, device), steps_of(synthetic_step, args.steps, device)]
    r, c = (args.steps * n / seconds for seconds in interleaved_medians(timed, args.rounds, warmup=0))

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    header = (
        "| date | device | model | input | batch | precision | compile | real img/s | synthetic img/s | ratio "
        "| commit | command |"
    )
    row = (
        f"| {datetime.now(timezone.utc):%Y-%m-%d} | {card} | {config.backbone} | {s}px | {n} | {precision} | "
        f"{'yes' if args.compile else 'no'} | {r:,.0f} | {c:,.0f} | {r / c:.2f} | {commit()} | "
        f"`{' '.join(['python', *sys.argv])}` |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text(
            "# Training throughput: real loop vs synthetic-data ceiling\n\n"
            "Measured by `benchmarks/train_throughput.py` (both numbers from the same process, median of rounds).\n"
            "ratio = real / synthetic: the share of the model's own speed the data path keeps.\n\n"
            + header
            + "\n|"
            + "---|" * (header.count("|") - 1)
            + "\n"
        )
    with out.open("a") as f:
        f.write(row + "\n")
    print(f"appended to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
