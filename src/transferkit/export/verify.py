"""Verify: an exported format may be served only if it agrees with PyTorch on held-out images.

Like Polygraphy's Comparator: PyTorch (fp32, CPU, eval mode) and the format's runtime get the *same* float32
input (decoded once, normalized once with `Preprocessing.normalize_numpy`) and their logits are compared per
head, on the test split of every dataset trained into that head (`verify_images` per dataset, all if fewer).

Per head verify reports and checks:
  max_abs_diff        max |logit_format - logit_pytorch|; must be <= max_abs_diff * max(1, max|logit_pytorch|)
                      (scale-aware: a model with logits around 40 gets 40x the absolute room of one around 1)
  mean_abs_diff       reported, not checked (the max is the stricter test)
  top1_agreement      fraction of images with the same argmax; must be >= min_top1_agreement where set
  accuracy drop       per dataset (a head shared by MNIST and digits may not hide a loss on one behind a gain on
                      the other), paired image by image: the images the format lost and gained against PyTorch.
                      Precisions that promise the same numbers (fp32, fp16) compare the measured drop; lossy ones
                      (int8, bf16) its one-sided upper confidence bound (evaluation/paired.py), so an artifact passes
                      when its drop is shown to be within the tolerance, and being more accurate never fails
Non-finite logits fail outright. The tolerances are the formats table's (`transferkit.artifact.TOLERANCES`),
overridable per export (`--max-acc-delta`, `--min-agreement`, `--gate-confidence`):

  precision  max_abs_diff (x scale)  min_top1_agreement  max drop (points)  judged on
  fp32       1e-3                    0.99                0.5                the measured drop
  fp16       5e-2                    0.99                0.3                the measured drop
  bf16       not checked             reported            1.0                its 95% upper bound
  int8       not checked             reported            1.0                its 95% upper bound

How many images: `--verify-images auto` (the default) takes every test image of each dataset, up to
VERIFY_PIXELS worth and VERIFY_MEMORY_BYTES of normalised input, never fewer than VERIFY_FLOOR (or the whole
split, if smaller) (`auto_verify_images`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.artifact import MAX_BATCH, TOLERANCES, Tolerance
from transferkit.errors import DataError
from transferkit.evaluation.paired import PairedDrop, best_provable_drop, images_needed, paired_drop

if TYPE_CHECKING:
    import torch

    from transferkit.runs import Run
    from transferkit.runtimes.runtime import Runtime


BATCH = MAX_BATCH  # images per forward pass, for PyTorch and for the runtime: every format takes this many
AUTO = "auto"
VERIFY_FLOOR = 2000  # images per dataset `auto` never goes below (the whole split, when it has fewer)
# `auto` takes as many images per dataset as hold this many pixels: every test image of an MNIST-sized split up
# to 70 px, the floor at 224 px, where the PyTorch reference needs 20 ms an image on two cores. A pixel budget,
# not a timed one: the gate's sample must not depend on how busy the machine is.
VERIFY_PIXELS = 50_000_000
VERIFY_MEMORY_BYTES = 2 * 2**30  # normalised float32 input of one split of every dataset, under `auto`


def parse_verify_images(value: int | str) -> int | str:
    """`auto` or a positive count of images per dataset; anything else is a ConfigError naming the fix."""
    from transferkit.errors import ConfigError

    if value == AUTO:
        return AUTO
    text = str(value).strip()
    count = int(text) if not isinstance(value, bool) and text.isdigit() else 0
    if count < 1:
        raise ConfigError(f"--verify-images must be auto or >= 1 (held-out images per dataset), got {value!r}")
    return count


def auto_verify_images(image_size: int, datasets: int) -> int:
    """Images per dataset under `--verify-images auto`: VERIFY_PIXELS worth, within VERIFY_MEMORY_BYTES for all
    the datasets, never below VERIFY_FLOOR."""
    by_pixels = VERIFY_PIXELS // (image_size * image_size)
    by_memory = VERIFY_MEMORY_BYTES // (3 * image_size * image_size * 4) // max(datasets, 1)
    return int(max(VERIFY_FLOOR, min(by_pixels, by_memory)))


@dataclass
class VerifyInputs:
    """Held-out images of every dataset, normalized once, and which rows belong to which head."""

    batch: np.ndarray  # float32 (N,3,S,S), the exact input both sides get
    rows: dict[str, np.ndarray]  # head -> row indices into batch
    labels: dict[str, np.ndarray]  # head -> int64 labels in the head's class order
    datasets: dict[str, dict[str, int]]  # head -> {dataset: images used}
    pixels: np.ndarray | None = None  # uint8 (N,S,S,3) that `batch` was normalised from (the corrupted sample's source)


def dataset_sources(run: Run) -> dict[str, str]:
    """labels.json dataset keys (short names) -> the DatasetSpec load_dataset takes: the one labels.json
    recorded, or (runs made before it recorded them) the config.data entry of that name."""
    from transferkit.data import DatasetSpec

    short_to_source = {DatasetSpec.parse(e, with_head=False).name: e for e in run.config.data} | run.labels.specs
    keys = list(run.labels.datasets)
    missing = [k for k in keys if k not in short_to_source]
    if missing:
        raise DataError(
            f"cannot tell which config.data entry held dataset(s) {missing}; config.data = {run.config.data}"
        )
    return {k: short_to_source[k] for k in keys}


def with_data(run: Run, data: list[str] | None) -> Run:
    """The run with its datasets read from `data` instead of the paths saved at training (`export --data`, for
    a run trained on another machine). Each item names a dataset of the run, by its name (`imagefolder:PATH`
    whose folder has the dataset's name) or explicitly (`NAME=imagefolder:PATH`)."""
    import dataclasses

    from transferkit.data import DatasetSpec

    if not data:
        return run
    specs = dict(dataset_sources(run))
    for item in data:
        name, sep, spec = item.partition("=")
        name, spec = (name, spec) if sep and not name.startswith("imagefolder:") else (None, item)
        name = name or DatasetSpec.parse(spec, with_head=False).name
        if name not in specs:
            raise DataError(
                f"--data {item}: the run has no dataset {name!r}; its datasets: {', '.join(specs)} "
                "(name one explicitly: NAME=imagefolder:PATH)"
            )
        specs[name] = spec
    return dataclasses.replace(run, labels=dataclasses.replace(run.labels, specs=specs))


def load_verify_inputs(
    run: Run, images_per_dataset: int, split: str = "test", loaded: dict[tuple[str, int], Any] | None = None
) -> VerifyInputs:
    """`split` images of every dataset in run.labels.datasets (a seeded subset of `images_per_dataset`): the
    test split for the gate, the validation split for choosing among INT8 attempts. `loaded`: one export's
    datasets already loaded (`_load`)."""
    pre = run.preprocessing
    pixels, rows, labels, datasets = [], {}, {}, {}
    offset = 0
    for dataset, source in dataset_sources(run).items():
        head = run.labels.datasets[dataset]
        classes = run.labels.heads[head]
        try:
            ds = _load(source, run, images_per_dataset, loaded)
        except Exception as exc:
            hint = (
                (
                    "; if the run was trained on another machine, point at the data here: transferkit export RUN "
                    f"--data {dataset}=imagefolder:PATH"
                )
                if source.startswith("imagefolder:")
                else ""
            )
            raise DataError(f"cannot load held-out images of {source} for verification: {exc}{hint}") from None
        missing = sorted(set(ds.classes) - set(classes))
        if missing:
            raise DataError(f"{source}: classes {missing[:5]} are not in head {head!r}; was the run trained on it?")
        to_head = np.array([classes.index(c) for c in ds.classes], dtype=np.int64)
        part = ds.split(split)
        if part.streamed:
            raise DataError(f"{source}: the {split} split is not in memory; verify decodes held-out splits only")
        n = len(part)
        pixels.append(part.images)
        rows[head] = np.concatenate([rows.get(head, np.empty(0, np.int64)), np.arange(offset, offset + n)])
        labels[head] = np.concatenate([labels.get(head, np.empty(0, np.int64)), to_head[part.labels]])
        datasets.setdefault(head, {})[dataset] = n
        offset += n
    if not pixels:
        raise DataError(f"{run.dir}: labels.json names no datasets; nothing to verify against")
    pixels = np.concatenate(pixels)
    return VerifyInputs(pre.normalize_numpy(pixels), rows, labels, datasets, pixels)


def _load(source: str, run: Run, limit: int, loaded: dict[tuple[str, int], Any] | None) -> Any:
    """load_dataset, once per (source, limit) in one export: it decodes and resizes all three splits, so the test
    and validation inputs, and each INT8 search's calibration images, would otherwise load the dataset again
    (ten loads, 31 s of a 32 px export's 3 minutes)."""
    from transferkit.data import load_dataset

    key = (source, limit)
    if loaded is not None and key in loaded:
        return loaded[key]
    ds = load_dataset(source, run.preprocessing, limit=limit)
    if loaded is not None:
        loaded[key] = ds
    return ds


def load_calibration_images(
    run: Run, images_per_dataset: int, loaded: dict[tuple[str, int], Any] | None = None
) -> np.ndarray:
    """Train-split images of every dataset of the run (a seeded subset of `images_per_dataset` each, the same
    on every export), normalised by the run's preprocessing: what INT8 calibration sees. Never test images:
    those are what the gate judges the quantized model on."""
    pre, parts = run.preprocessing, []
    for source in dataset_sources(run).values():
        try:
            ds = _load(source, run, images_per_dataset, loaded)
        except Exception as exc:
            raise DataError(f"cannot load train images of {source} for INT8 calibration: {exc}") from None
        if ds.train.streamed:  # an image folder too large for memory: decode just the images used
            from transferkit.data.imagefolder import decode_file

            parts.append(np.stack([decode_file(p, pre) for p in ds.train.paths[:images_per_dataset]]))
        else:
            parts.append(ds.train.images[:images_per_dataset])
    return pre.normalize_numpy(np.concatenate(parts))


def pytorch_logits(model: torch.nn.Module, batch: np.ndarray, head_names: list[str]) -> dict[str, np.ndarray]:
    """The reference: ExportModule in fp32 eval mode on CPU, on a copy (the model handed to the exporters keeps
    its layout), run as oneDNN runs it fastest (`reference_runner`)."""
    import torch

    reference = reference_runner(model, batch[:3])
    outs: list[tuple] = []
    with torch.inference_mode():
        for i in range(0, len(batch), BATCH):
            x = torch.from_numpy(batch[i : i + BATCH]).contiguous(memory_format=torch.channels_last)
            outs.append(tuple(t.float().numpy() for t in reference(x)))
    return {h: np.concatenate([o[k] for o in outs]) for k, h in enumerate(head_names)}


def reference_runner(model: torch.nn.Module, example: np.ndarray) -> Callable[[torch.Tensor], tuple]:
    """The model traced, frozen and optimised for inference (BatchNorm folded into its convolution, oneDNN's
    channels-last kernels): 11 ms an image at 224 px on two cores, against 20 for the eager model channels-last
    and 37 contiguous, the same fp32 arithmetic up to rounding (3.6e-6 on logits of 2.9). A model that cannot be
    traced, or whose trace does not give the eager model's logits on `example` (a batch size other than the
    traced one included), runs eagerly, channels-last."""
    import copy
    import warnings

    import torch

    eager = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    if len(example) < 3:  # no batch size beside the traced one to check the trace on
        return eager
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
            x = torch.from_numpy(np.ascontiguousarray(example)).contiguous(memory_format=torch.channels_last)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(eager, x[:2])))
            for want, got in zip(eager(x), frozen(x), strict=True):
                scale = max(1.0, float(want.abs().max()))
                if not torch.allclose(want, got, rtol=0, atol=1e-4 * scale):
                    return eager
        return frozen
    except Exception:  # noqa: BLE001 - tracing is an optimisation; the eager model is the same reference
        return eager


def onnx_file_logits(path: Path, batch: np.ndarray, head_names: list[str]) -> dict[str, np.ndarray]:
    """An ONNX file's logits from ONNX Runtime on CPU, as verify runs them (for a candidate file the INT8
    repair gates before it becomes an artifact)."""
    from transferkit.runtimes.runtime import onnx_session

    session = onnx_session(path)
    parts = [
        session.run(head_names, {session.get_inputs()[0].name: batch[i : i + BATCH]})
        for i in range(0, len(batch), BATCH)
    ]
    return {h: np.concatenate([p[k] for p in parts]) for k, h in enumerate(head_names)}


SINGLES = 8  # images the gate also runs one at a time: a server answers single requests whenever load is low


def single_image_failure(runtime: Runtime, batch: np.ndarray, batched: dict[str, np.ndarray]) -> str | None:
    """Why the artifact fails when its first SINGLES images, each run alone, get other logits than the same
    images in the verification batches (a runtime whose answer depends on the batch it lands in), else None."""
    n = min(SINGLES, len(batch))
    worst = 0.0
    for i in range(n):
        alone = runtime.run(batch[i : i + 1])
        worst = max(worst, *(float(np.abs(alone[h][0] - batched[h][i]).max()) for h in runtime.heads))
    scale = max(float(np.abs(batched[h][:n]).max()) for h in runtime.heads)
    if worst <= 0.05 * (1.0 + scale):
        return None
    return (
        f"one image alone gets other logits than in a batch (max difference {worst:.2f} over {n} images): served "
        "answers would depend on the load"
    )


def runtime_logits(runtime: Runtime, batch: np.ndarray) -> dict[str, np.ndarray]:
    parts = [runtime.run(batch[i : i + BATCH]) for i in range(0, len(batch), BATCH)]
    return {h: np.concatenate([p[h] for p in parts]) for h in runtime.heads}


def subset(
    inputs: VerifyInputs, reference: dict[str, np.ndarray], logits: dict[str, np.ndarray], rows: np.ndarray
) -> tuple[VerifyInputs, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Restrict a comparison to `rows` of inputs.batch: `logits` are the candidate's on those rows, in that
    order (what a validation over some of the images computes); each head keeps its datasets in order."""
    rows = np.asarray(rows, dtype=np.int64)
    position = {int(r): i for i, r in enumerate(rows)}
    new_rows, labels, datasets = {}, {}, {}
    for head, head_rows in inputs.rows.items():
        keep = np.isin(head_rows, rows)
        if not keep.any():
            continue
        new_rows[head] = np.array([position[int(r)] for r in head_rows[keep]], dtype=np.int64)
        labels[head] = inputs.labels[head][keep]
        counts, start = {}, 0
        for dataset, n in inputs.datasets[head].items():
            k = int(keep[start : start + n].sum())
            start += n
            if k:
                counts[dataset] = k
        datasets[head] = counts
    pixels = inputs.pixels[rows] if inputs.pixels is not None else None
    picked = VerifyInputs(inputs.batch[rows], new_rows, labels, datasets, pixels)
    return picked, {h: r[rows] for h, r in reference.items() if h in new_rows}, {h: logits[h] for h in new_rows}


def compare(
    reference: dict[str, np.ndarray],
    candidate: dict[str, np.ndarray],
    inputs: VerifyInputs,
    precision: str,
    tolerance: Tolerance | None = None,
) -> dict[str, Any]:
    """Per-head and per-dataset statistics and the pass/fail decision against `tolerance` (the format row's
    tolerance for `precision`; by default TOLERANCES[precision]). The accuracy decision is per dataset, paired
    image by image (evaluation/paired.py); a head's own numbers are reported beside it."""
    tol = tolerance or TOLERANCES[precision]
    bound = tol.max_acc_delta_points
    heads, failures = {}, []
    for head, rows in inputs.rows.items():
        ref, got, y = reference[head][rows], candidate[head][rows], inputs.labels[head]
        head_failures = []
        if not np.isfinite(got).all():
            head_failures.append(f"{head}: non-finite logits")
            got = np.nan_to_num(got, nan=0.0, posinf=0.0, neginf=0.0)
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        scale = max(1.0, float(np.abs(ref).max()))
        allowed = None if tol.max_abs_diff is None else tol.max_abs_diff * scale
        ref_right, got_right = ref.argmax(1) == y, got.argmax(1) == y
        agreement = float((got.argmax(1) == ref.argmax(1)).mean())
        head_drop = paired_drop(ref_right, got_right, tol.confidence)
        if allowed is not None and float(diff.max()) > allowed:
            head_failures.append(f"{head}: max |logit diff| {diff.max():.3g} > {allowed:.3g}")
        if tol.min_top1_agreement is not None and agreement < tol.min_top1_agreement:
            head_failures.append(f"{head}: top-1 agreement {agreement:.2%} < {tol.min_top1_agreement:.1%}")
        per_dataset, start = {}, 0
        for dataset, n in inputs.datasets[head].items():  # rows of a head are its datasets, in this order
            part = slice(start, start + n)
            start += n
            drop = paired_drop(ref_right[part], got_right[part], tol.confidence)
            per_dataset[dataset] = {
                "images": n,
                "accuracy_pytorch": float(ref_right[part].mean()),
                "accuracy_format": float(got_right[part].mean()),
                "accuracy_delta_points": -drop.drop_points,
                **drop.as_dict(),
                "passed": drop.within(bound),
            }
            if not drop.within(bound):
                head_failures.append(f"{head}/{dataset}: {_drop_text(drop, bound)}")
        heads[head] = {
            "images": int(len(rows)),
            "datasets": inputs.datasets[head],
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "allowed_max_abs_diff": allowed,
            "top1_agreement": agreement,
            "accuracy_pytorch": float(ref_right.mean()),
            "accuracy_format": float(got_right.mean()),
            "accuracy_delta_points": -head_drop.drop_points,
            **head_drop.as_dict(),
            "per_dataset": per_dataset,
            "passed": not head_failures,
        }
        failures += head_failures
    return {
        "passed": not failures,
        "precision": precision,
        "tolerance": asdict(tol),
        "decision": _decision_text(tol),
        "heads": heads,
        "failures": failures,
    }


def _decision_text(tol: Tolerance) -> str:
    if tol.confidence is None:
        return f"measured accuracy drop <= {tol.max_acc_delta_points:g} points per dataset"
    return (
        f"accuracy drop <= {tol.max_acc_delta_points:g} points per dataset at {tol.confidence:.0%} one-sided "
        "confidence (paired, Agresti-Min); a gain never fails"
    )


def _drop_text(drop: PairedDrop, bound: float) -> str:
    """Why a dataset failed, with what would make it pass."""
    if drop.upper_points is None:
        return f"accuracy drop {drop.drop_points:+.2f} points beyond {bound:g}"
    text = (
        f"accuracy drop {drop.drop_points:+.2f} points (lost {drop.lost}, gained {drop.gained} of {drop.images} "
        f"images), upper {drop.confidence:.0%} bound {drop.upper_points:.2f} > {bound:g}"
    )
    if best_provable_drop(drop.images, drop.confidence) > bound:
        text += (
            f"; {drop.images} images cannot show a drop <= {bound:g} even with no disagreement: verify on at least "
            f"{images_needed(bound, drop.confidence)} (--verify-images) or allow more (--max-acc-delta)"
        )
    return text
