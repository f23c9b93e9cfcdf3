"""Small datasets under the default settings: does `transferkit train` with no batch size train as well as the
best batch size a sweep finds, and as well as timm's train.py with its defaults, from 50 to 2,000 images per
class? Prints a table and writes docs/small_data.md with the command and the commit.

    python benchmarks/small_data.py [--cells fashion2:224:50,fashion:32:400,...] [--batches 8,16,32,64,128]
        [--epochs 3] [--timm-train PATH/train.py] [--ablation] [--out docs/small_data.md]

A cell is DATASET:IMAGE_SIZE:IMAGES_PER_CLASS[@B1/B2/...] (its own sweep, for a cell whose runs are long).
Datasets, all real and shipped in packages:
  fashion   Fashion-MNIST, 10 classes (Debian's dataset-fashion-mnist)
  fashion2  Fashion-MNIST's Sneaker and Ankle boot: two classes, as a user's first photo set often has
  digits    scikit-learn's UCI optical digits, 10 classes (at most 100 images per class here)
Each cell is written once as an image folder (PNG): train/ with N images per class, val/ and test/ fixed per
dataset whatever N (100 and 200 per class for Fashion-MNIST, 30 and 40 for digits), so every run of a dataset is
judged on the same images. Every run trains with seed 0 for --epochs epochs through the real command line:
  default   `transferkit train --data imagefolder:CELL --image-size S` and nothing else
  b=K       the same with --batch-size K (the sweep; precise BatchNorm on, as by default)
  timm      timm's train.py with its own defaults on the same folder (its own venv, made here): model
            mobilenetv2_100 from the same ImageNet file as ours (torchvision's, mapped by parameter order), the
            same epochs and image size; its batch is ours (its default 128 drops every batch of a 100-image set)
and is scored on test/ (`transferkit eval --split test`; timm's validate.py for timm). The sweep's best is
the best test accuracy of the b=K runs, an oracle no user has: the default is compared with it. The sweep's
run at the default's own batch is the default run (same seed, same settings: the same run on a CPU).
--ablation adds, on fashion2:224:200 at 2 epochs and digits:32:20 at 3, the four combinations of the two changes
of this release (the data floor of --batch-size auto, and --precise-bn): the old default is batch 128 and
--precise-bn 0.
timm's train.py is not in its wheel: pass a checkout's (github.com/huggingface/pytorch-image-models).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import command_line, commit, write_report  # noqa: E402

from transferkit.data import builtin  # noqa: E402
from transferkit.machine import Machine  # noqa: E402

PY = ROOT / ".venv" / "bin" / "python"
TIMM_PIN = "timm==1.0.31"
DATASETS = {  # name -> (loader, classes kept or None for all, val and test images per class)
    "fashion": (builtin.load_fashion_mnist, None, (100, 200)),
    "fashion2": (builtin.load_fashion_mnist, ["Sneaker", "Ankle boot"], (100, 200)),
    "digits": (builtin.load_digits, None, (30, 40)),
}
DEFAULT_CELLS = (
    "fashion:32:50,fashion:32:100,fashion:32:400,digits:32:50,digits:32:100,"
    "fashion2:224:50,fashion2:224:100,fashion2:224:400,fashion:32:2000@32/64/128"
)


def write_cell(work: Path, dataset: str, per_class: int) -> Path:
    """The image folder of one cell (written once; a finished folder has a .done marker)."""
    folder = work / "data" / f"{dataset}-{per_class}"
    if (folder / ".done").is_file():
        return folder
    loader, keep, (n_val, n_test) = DATASETS[dataset]
    splits, classes = loader()
    pool_x = np.concatenate([splits["train"][0], splits["val"][0]])
    pool_y = np.concatenate([splits["train"][1], splits["val"][1]])
    rng = np.random.default_rng(0)
    kept = keep or classes
    for c in kept:
        k = classes.index(c)
        name = c.replace("/", "-")
        order = rng.permutation(np.flatnonzero(pool_y == k))  # val first, fixed whatever per_class is
        if len(order) < n_val + per_class:
            raise SystemExit(f"{dataset} has {len(order)} images of {c!r}: too few for {per_class} per class")
        test = rng.permutation(np.flatnonzero(splits["test"][1] == k))[:n_test]
        for split, x, idx in (
            ("val", pool_x, order[:n_val]),
            ("train", pool_x, order[n_val : n_val + per_class]),
            ("test", splits["test"][0], test),
        ):
            out = folder / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(x[i]).convert("RGB").save(out / f"{i}.png")
    (folder / ".done").touch()
    return folder


def run(cmd: list[str], log: Path) -> float:
    """Run a command to the end, its output into `log` -> seconds taken; a failure stops the benchmark."""
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def transferkit_run(out: Path, folder: Path, size: int, epochs: int, extra: list[str]) -> dict:
    """Train (or reuse a finished run) and score on test/ -> {test, val, batch, steps, seconds}."""
    if not (out / "eval.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # a run stopped part way starts again
        cmd = [str(PY), "-m", "transferkit", "train", "--data", f"imagefolder:{folder}", "--image-size", str(size)]
        cmd += ["--epochs", str(epochs), "--seed", "0", "--out", str(out), *extra]
        seconds = run(cmd, out.parent / f"{out.name}.train.log")
        run([str(PY), "-m", "transferkit", "eval", str(out), "--split", "test"], out.parent / f"{out.name}.eval.log")
        (out / "seconds.txt").write_text(f"{seconds:.1f}")
    import yaml

    test = json.loads((out / "eval.json").read_text())["accuracy"]
    metrics = json.loads((out / "metrics.json").read_text())
    batch = yaml.safe_load((out / "config.yaml").read_text())["batch_size"]
    n_train = sum(1 for p in (folder / "train").rglob("*.png"))
    return {
        "test": float(np.mean(list(test.values()))),
        "val": metrics["best"]["val_acc_mean"],
        "batch": batch,
        "steps": -(-n_train // batch) * epochs,
        "seconds": float((out / "seconds.txt").read_text()),
    }


def timm_venv(work: Path) -> Path:
    """A venv of timm's own, with the torch this project pins (taken from the local wheel cache where one is)."""
    venv = work / "venv-timm"
    py = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.14.1", "torchvision==0.29.1"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", TIMM_PIN], check=True)
        (venv / ".installed").touch()
    return py


def timm_weights(work: Path, py: Path) -> Path:
    """torchvision's ImageNet MobileNetV2 file (installed by `make setup`) as timm's mobilenetv2_100 state dict:
    the two implementations hold the same tensors in the same order under other names."""
    out = work / "mobilenetv2_100-from-torchvision.pth"
    if out.is_file():
        return out
    script = """
import sys, torch, timm, torchvision
src = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").state_dict()
dst = timm.create_model("mobilenetv2_100", pretrained=False).state_dict()
src_keys = [k for k in src if not k.endswith("num_batches_tracked")]
dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
assert len(src_keys) == len(dst_keys), (len(src_keys), len(dst_keys))
mapped = {}
for s, d in zip(src_keys, dst_keys):
    assert src[s].shape == dst[d].shape, (s, d, src[s].shape, dst[d].shape)
    mapped[d] = src[s]
torch.save(mapped, sys.argv[1])
"""
    subprocess.run([str(py), "-c", script, str(out)], check=True)
    return out


def timm_run(out: Path, folder: Path, size: int, epochs: int, batch: int, timm: tuple[Path, Path, Path]) -> dict:
    """timm's train.py with its defaults (the batch excepted, see the module docstring), then its validate.py
    on test/ with the best checkpoint -> {test, val, seconds}."""
    py, train_py, weights = timm
    classes = len([p for p in (folder / "train").iterdir() if p.is_dir()])
    result = out / "test.json"
    if not result.is_file():
        out.mkdir(parents=True, exist_ok=True)
        common = ["--model", "mobilenetv2_100", "--num-classes", str(classes), "--img-size", str(size)]
        common += ["--device", "cpu", "--workers", "2"]
        cmd = [str(py), str(train_py), "--data-dir", str(folder), "--val-split", "val", *common]
        cmd += ["--pretrained", "--pretrained-path", str(weights), "--epochs", str(epochs), "--batch-size", str(batch)]
        cmd += ["--output", str(out), "--experiment", "run", "--seed", "0", "--log-interval", "1000"]
        seconds = run(cmd, out / "train.log")
        best = out / "run" / "model_best.pth.tar"
        validate = train_py.parent / "validate.py"
        cmd = [str(py), str(validate), "--data-dir", str(folder), "--split", "test", *common]
        cmd += ["--checkpoint", str(best), "--results-file", str(out / "validate.json"), "--results-format", "json"]
        run(cmd, out / "validate.log")
        top1 = json.loads((out / "validate.json").read_text())
        top1 = top1[0] if isinstance(top1, list) else top1
        rows = (out / "run" / "summary.csv").read_text().splitlines()
        header, values = rows[0].split(","), [r.split(",") for r in rows[1:]]
        val = max(float(v[header.index("eval_top1")]) for v in values) / 100
        result.write_text(json.dumps({"test": top1["top1"] / 100, "val": val, "seconds": seconds}))
    return json.loads(result.read_text())


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def sweep_table(cells: list[str], args, work: Path, timm, report) -> tuple[list[str], list[dict]]:
    """The comparison, one row per cell; `report(rows)` after each, so a stopped run keeps what it measured."""
    head = "| cell | train images | default: batch, steps | default test % | sweep best (batch) | default - best |"
    head += " timm test % | default - timm |" if timm else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    records = []
    for cell in cells:
        cell, _, own = cell.partition("@")  # CELL@B1/B2/...: a smaller sweep where a large cell's runs are long
        batches = [int(b) for b in (own.replace("/", ",") or args.batches).split(",")]
        dataset, size, per_class = cell.split(":")
        size, per_class = int(size), int(per_class)
        folder = write_cell(work, dataset, per_class)
        runs = work / "runs" / cell.replace(":", "-")
        runs.mkdir(parents=True, exist_ok=True)
        default = transferkit_run(runs / "default", folder, size, args.epochs, [])
        # the default's own batch is not trained twice: the same seed and settings train the same run
        sweep = {
            b: default
            if b == default["batch"]
            else transferkit_run(runs / f"b{b}", folder, size, args.epochs, ["--batch-size", str(b)])
            for b in batches
        }
        best_b = max(sweep, key=lambda b: sweep[b]["test"])
        record = {"cell": cell, "default": default, "sweep": {str(b): r for b, r in sweep.items()}, "best": best_b}
        row = (
            f"| {cell}{f' (sweep {own})' if own else ''} | {sum(1 for _ in (folder / 'train').rglob('*.png'))} | {default['batch']}, {default['steps']} "
            f"| {pct(default['test'])} | {pct(sweep[best_b]['test'])} ({best_b}) "
            f"| {100 * (default['test'] - sweep[best_b]['test']):+.1f} |"
        )
        if timm:
            t = timm_run(runs / "timm", folder, size, args.epochs, default["batch"], timm)
            record["timm"] = t
            row += f" {pct(t['test'])} | {100 * (default['test'] - t['test']):+.1f} |"
        lines.append(row)
        records.append(record)
        report(lines, records)
    return lines, records


# (dataset, image size, images per class, epochs, runs folder): the photo-like case the defaults are for, and
# a 32 px one where the old default collapsed to chance
ABLATION_CELLS = (("fashion2", 224, 200, 2, "ablation"), ("digits", 32, 20, 3, "ablation-digits-32-20"))
ABLATION_VARIANTS = {
    "old default: batch 128, no precise BN": ["--batch-size", "128", "--precise-bn", "0"],
    "the data floor alone (auto batch), no precise BN": ["--precise-bn", "0"],
    "precise BN alone, batch 128": ["--batch-size", "128"],
    "**both (the new default)**": [],
}


def ablation_table(args, work: Path) -> tuple[list[str], dict]:
    """What each change does alone, on each ABLATION_CELLS cell: batch, steps, validation and test accuracy."""
    head, rule, rows, record = "| settings |", "|---|", {name: f"| {name} |" for name in ABLATION_VARIANTS}, {}
    for dataset, size, per_class, epochs, folder_name in ABLATION_CELLS:
        folder = write_cell(work, dataset, per_class)
        runs = work / "runs" / folder_name
        runs.mkdir(parents=True, exist_ok=True)
        cell = f"{dataset}:{size}:{per_class}, {epochs} epochs"
        head += f" {cell}: batch, steps | validation % | test % |"
        rule += "--:|--:|--:|"
        for i, (name, extra) in enumerate(ABLATION_VARIANTS.items()):
            r = transferkit_run(runs / f"v{i}", folder, size, epochs, extra)
            record.setdefault(name, {})[cell] = r
            rows[name] += f" {r['batch']}, {r['steps']} | {pct(r['val'])} | {pct(r['test'])} |"
            print(cell, rows[name], flush=True)
    return [head, rule, *rows.values()], record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=DEFAULT_CELLS)
    ap.add_argument("--batches", default="8,16,32,64,128")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--timm-train", type=Path, help="timm's train.py (validate.py beside it)")
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".small_data")
    ap.add_argument("--out", default=str(ROOT / "docs" / "small_data.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.work.mkdir(parents=True, exist_ok=True)
    timm = None
    if args.timm_train:
        py = timm_venv(args.work)
        timm = (py, args.timm_train.resolve(), timm_weights(args.work, py))
    started = time.time()
    ablation, ablation_record = ablation_table(args, args.work) if args.ablation else ([], {})

    def report(sweep: list[str], records: list[dict]) -> None:
        (args.work / "results.json").write_text(json.dumps({"ablation": ablation_record, "cells": records}, indent=1))
        lines = [
            "# Small datasets under the default settings",
            "",
            f"Command: `{command_line()}` at commit {commit()} ({(time.time() - started) / 60:.0f} min; runs "
            "already finished in --work by an earlier invocation at the same training code are reused). "
            f"Machine: {Machine.this().describe()}.",
            "",
            "How it is measured: benchmarks/small_data.py's docstring. Accuracy on each cell's test/ folder; seed 0.",
        ]
        if ablation:
            lines += [
                "",
                "## The two changes of `--batch-size auto`'s data floor and `--precise-bn`, alone and together",
                "",
            ]
            lines += ablation
        lines += [
            "",
            f"## Default vs the best batch of a sweep ({args.batches}) and timm's defaults, {args.epochs} epochs",
        ]
        lines += ["", *sweep]
        write_report(args.out, lines)

    cells = [c for c in args.cells.split(",") if c]
    sweep_table(cells, args, args.work, timm, report)


if __name__ == "__main__":
    main()
