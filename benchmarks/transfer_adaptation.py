"""Section e of benchmarks/transfer.py: what each part of the `--unlabeled` recipe adds, on MNIST -> sklearn digits.

Arms: source-only; the previous recipe (FixMatch + distribution alignment, every adaptation part off); that
recipe plus each part alone (AdaBN labeller, mean teacher, self-training rounds); the default recipe
(TrainConfig's defaults); target-supervised. Every arm on every seed; mean ± std over seeds; gap closed
= (arm - source-only) / (target-supervised - source-only) on the means; wall and CPU time per training run.
One more arm distils each seed's default run into a fresh student of the same architecture (noisy-student
style: `transferkit distill --teachers DEFAULT_RUN --data mnist --unlabeled digits`), the fourth candidate
the recipe was chosen among. `--arms` reruns only the named arms and keeps the others' results from the
previous section_e.json (every arm records the commit it ran at). Then, on the source-only and default runs,
AdaBN applied to the *final* model (statistics re-estimated on the digits train images, or on those mixed
with as many MNIST train images), which is not part of the recipe.

The recipe was chosen on the digits validation split; the test split is reported, never used to choose.
Writes the measured part of docs/adaptation.md between its markers and keeps the text around them.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from transferkit.config import TrainConfig
from transferkit.data import DatasetSpec, load_dataset
from transferkit.evaluation.matrix import evaluate_matrices
from transferkit.runs import load_run, load_run_model
from transferkit.training import train
from transferkit.training.adaptation import adapt_batchnorm
from transferkit.training.evaluate import accuracy, predict_logits

BEGIN, END = "<!-- section e: begin (written by benchmarks/transfer.py) -->", "<!-- section e: end -->"
# the recipe before this section's parts: FixMatch with distribution alignment, delayed start and ramp-up
PREVIOUS = dict(unlabeled=["digits"], adapt_bn=False, teacher_ema=0.0, rounds=1)
DEFAULTS = TrainConfig()
ARMS = [
    ("source", "source-only (MNIST labels; MNIST head scored on digits)", dict()),
    ("previous", "pseudo-labels, previous recipe (FixMatch + distribution alignment)", PREVIOUS),
    ("adabn", "previous + AdaBN labeller (`--adapt-bn`)", {**PREVIOUS, "adapt_bn": True}),
    ("teacher", "previous + mean teacher (`--teacher-ema 0.9`)", {**PREVIOUS, "teacher_ema": 0.9}),
    ("rounds", "previous + 3 self-training rounds (`--rounds 3`)", {**PREVIOUS, "rounds": 3}),
    ("default", "**default `--unlabeled digits`** (AdaBN + mean teacher + 3 rounds)", dict(unlabeled=["digits"])),
    ("no-teacher", "default without the mean teacher (`--teacher-ema 0`)", dict(unlabeled=["digits"], teacher_ema=0.0)),
    ("one-round", "default with one round (`--rounds 1`)", dict(unlabeled=["digits"], rounds=1)),
    (
        "noisy",
        "default, then distilled into a fresh student (`distill --teachers` the default run, `--unlabeled "
        "digits`; time: the student's, on top of the default run's)",
        dict(unlabeled=["digits"], teachers="e-default-seed{seed}"),
    ),
    ("target", "target-supervised (MNIST + digits labels)", dict(data=["mnist", "digits"])),
]


def _train(name: str, base: TrainConfig, root: Path, overrides: dict) -> tuple[Path, float, float]:
    out = root / name
    if out.exists():
        shutil.rmtree(out)
    wall, cpu = time.perf_counter(), time.process_time()
    train(replace(base, out=str(out), **overrides))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"[e/{name}] trained in {wall:.0f}s (CPU {cpu:.0f}s)", flush=True)
    return out, wall, cpu


def _scores(run_dir: Path) -> dict[str, float]:
    out = {}
    for split in ("val", "test"):
        matrix, _ = evaluate_matrices(load_run(run_dir), ["digits"], split)
        out[f"digits_{split}"] = matrix.cells["mnist"]["digits"].accuracy
        out[f"mnist_{split}"] = matrix.cells["mnist"]["mnist"].accuracy
    return out


def final_model_adabn(run_dir: Path, seed: int) -> dict[str, dict[str, float]]:
    """Test accuracy of a run's final model with its own BatchNorm statistics, with statistics re-estimated on
    the digits train images, and on those mixed with as many MNIST train images."""
    model, run = load_run_model(run_dir)
    pre, limit = run.preprocessing, run.config.limit
    digits, mnist = (load_dataset(DatasetSpec.parse(n, with_head=False), pre, limit) for n in ("digits", "mnist"))
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    rng = np.random.default_rng(seed)
    target = nchw(digits.train.images)
    source = nchw(mnist.train.images[rng.choice(len(mnist.train), len(target), replace=len(target) > len(mnist.train))])
    mixed = torch.cat([target, source])[torch.from_numpy(rng.permutation(2 * len(target)))]

    def score(m) -> dict[str, float]:
        return {
            d.name: accuracy(predict_logits(m, d.test.images, pre, heads=["mnist"])["mnist"], d.test.labels)
            for d in (digits, mnist)
        }

    out = {"own": score(model)}
    for key, images in (("target", target), ("mix", mixed)):
        m = copy.deepcopy(model)
        adapt_batchnorm(m, images.split(256), pre)
        out[key] = score(m)
    return out


def _overrides(overrides: dict, root: Path, seed: int) -> dict:
    """An arm's TrainConfig overrides; `teachers` names the run (of this seed) to distil."""
    if "teachers" not in overrides:
        return overrides
    teacher = root / overrides["teachers"].format(seed=seed)
    if not (teacher / "model.pt").is_file():
        raise SystemExit(f"arm needs the run {teacher}: run its arm first (it comes earlier in the same --arms)")
    return {**overrides, "teachers": [str(teacher)]}


def run_section_e(
    base: TrainConfig,
    root: Path,
    seeds: list[int],
    commit: str,
    arms: list[str] | None = None,
    previous: dict | None = None,
) -> dict:
    """Train and score every arm (or only `arms`, keeping the other arms' entries of `previous`) on every seed."""
    keys = [key for key, _, _ in ARMS if arms is None or key in arms]
    kept = previous or {"results": {}, "adabn_final": {}}
    for rows in kept["results"].values():  # entries saved before they recorded their commit carry the file's
        for entry in rows:
            entry.setdefault("commit", kept.get("commit"))
    results: dict = {key: [] if key in keys else kept["results"].get(key, []) for key, _, _ in ARMS}
    adabn_final: dict = {key: [] if key in keys else kept["adabn_final"].get(key, []) for key in ("source", "default")}
    for seed in seeds:
        for key, _, overrides in ARMS:
            if key not in keys:
                continue
            d, wall, cpu = _train(
                f"e-{key}-seed{seed}", replace(base, seed=seed), root, _overrides(overrides, root, seed)
            )
            entry = {"seed": seed, "commit": commit, "wall_s": wall, "cpu_s": cpu, **_scores(d)}
            if (d / "rounds.json").is_file():
                entry["rounds"] = json.loads((d / "rounds.json").read_text())["rounds"]
            history = json.loads((d / "metrics.json").read_text())["history"]
            if "pseudo_coverage" in history[-1]:
                entry["pseudo"] = [history[-1]["pseudo_coverage"], history[-1]["pseudo_accuracy"]]
            results[key].append(entry)
            if key in adabn_final:
                adabn_final[key].append(final_model_adabn(d, seed))
            print(
                f"[e/{key}] seed {seed}: digits test {entry['digits_test']:.4f}  val {entry['digits_val']:.4f}  "
                f"MNIST test {entry['mnist_test']:.4f}",
                flush=True,
            )
    return {"results": results, "adabn_final": adabn_final}


def _ms(values: list[float], pct: bool = True) -> str:
    f = 100.0 if pct else 1.0
    return f"{f * np.mean(values):.1f} ± {f * np.std(values):.1f}"


def section_e_markdown(data: dict, settings: str) -> str:
    res = {key: rows for key, rows in data["results"].items() if rows}  # an arm never measured has no row
    seeds = [e["seed"] for e in res["source"]]
    at: dict[str, list[str]] = {}  # commit -> the arms measured at it
    for key, rows in res.items():
        for c in dict.fromkeys(e["commit"] for e in rows):
            at.setdefault(c, []).append(key)
    mean = {k: float(np.mean([e["digits_test"] for e in v])) for k, v in res.items()}
    mean_val = {k: float(np.mean([e["digits_val"] for e in v])) for k, v in res.items()}
    gap = lambda m, k: (m[k] - m["source"]) / (m["target"] - m["source"])  # noqa: E731
    prev_wall = np.mean([e["wall_s"] for e in res["previous"]])
    prev_cpu = np.mean([e["cpu_s"] for e in res["previous"]])
    lines = [
        BEGIN,
        f"Produced by {'; then '.join(data['commands'])}; seeds {', '.join(map(str, seeds))}."
        + (
            ""
            if len(at) == 1
            else " Arms by the commit they ran at: "
            + "; ".join(f"{c}: {', '.join(keys)}" for c, keys in at.items())
            + "."
        ),
        f"Settings: {settings}.",
        "",
        "| run | digits test % | gap closed | digits val % | MNIST test % | wall s / run (x previous) | CPU s / run (x previous) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label, _ in ARMS:
        if key not in res:
            continue
        rows = res[key]
        closed = "" if key in ("source", "target") else f"{gap(mean, key):.1%}"
        wall = np.mean([e["wall_s"] for e in rows])
        cpu = np.mean([e["cpu_s"] for e in rows])
        lines.append(
            f"| {label} | {_ms([e['digits_test'] for e in rows])} | {closed} | {_ms([e['digits_val'] for e in rows])} | "
            f"{_ms([e['mnist_test'] for e in rows])} | {wall:.0f} ({wall / prev_wall:.2f}x) | {cpu:.0f} ({cpu / prev_cpu:.2f}x) |"
        )
    lines += [
        "",
        "Gap closed on the validation split (what the recipe was chosen on): "
        + ", ".join(f"{k} {gap(mean_val, k):.1%}" for k in res if k not in ("source", "target"))
        + ".",
        "",
        "Pseudo-labels in the last epoch (kept share of the unlabeled images seen, and how many of those were "
        "right; true labels used only for this report), and for rounds the labels handed to the last round:",
        "",
    ]
    for key in res:
        rows = [e for e in res[key] if "pseudo" in e]
        if rows:
            text = f"- {key}: {_ms([e['pseudo'][0] for e in rows])}% kept, {_ms([e['pseudo'][1] for e in rows])}% right"
            given = [e["rounds"][-1]["pseudo_labels"] for e in res[key] if "rounds" in e]
            if given:
                text += (
                    f"; between rounds {_ms([g['coverage'] for g in given])}% of digits train labelled, "
                    f"{_ms([g['accuracy'] for g in given])}% right"
                )
            lines.append(text)
    lines += [
        "",
        "AdaBN on the final model (not part of the recipe): test accuracy with the model's own BatchNorm "
        "statistics, re-estimated on the digits train images, or on those mixed with as many MNIST train images:",
        "",
        "| run | statistics | digits test % | MNIST test % |",
        "|---|---|---|---|",
    ]
    for key, entries in data["adabn_final"].items():
        for stats in ("own", "target", "mix"):
            lines.append(
                f"| {key} | {stats} | {_ms([e[stats]['digits'] for e in entries])} | "
                f"{_ms([e[stats]['mnist'] for e in entries])} |"
            )
    lines.append(END)
    return "\n".join(lines)
