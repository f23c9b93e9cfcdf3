"""`transferkit drift RUN --traffic DIR`: has the traffic a served model sees moved away from its training data?

Black-box shift detection on the model's own outputs, the strongest cheap detector in Rabanser et al., "Failing
Loudly" (NeurIPS 2019): per head, the softmax outputs of the run's held-out test images (the reference, scored
by the run's verified artifact, the one that serves) against those of the captured traffic (serve --capture):
- class probabilities: a two-sample Kolmogorov-Smirnov test per class, Bonferroni-corrected over the classes;
- predicted labels: a chi-square test of the top-1 class counts (label shift);
- confidence: a KS test of the top-1 softmax score (a model unsure of what it now sees).
A head drifts when any of its three corrected p-values is below --alpha; the verdict is the head's or the
run's. Windows (`--window N`: consecutive runs of N captured rows by time, `--since` to drop older rows) give
one verdict each; the newest window's verdict is the command's exit code (3: drift), for schedulers and CI.
For a drifting head the report says how many captured rows it took: the smallest prefix of the window (50, 100,
200, ... rows) at which the same tests already fall below --alpha.

Representation-level tests (MMD on the backbone's features) need the features, which the served artifact does
not output; they are not computed here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import DataError, TransferkitError

ALPHA = 0.01
REFERENCE_IMAGES = 2000  # held-out test images per dataset scored for the reference
PREFIXES = (50, 100, 200, 500, 1000, 2000, 5000)


@dataclasses.dataclass
class HeadTest:
    rows: int
    class_p: float  # the smallest per-class KS p-value times the number of classes (Bonferroni), at most 1
    label_p: float
    confidence_p: float
    drift: bool
    needed: int | None = None  # rows of the window the tests first fell below alpha at

    @property
    def p(self) -> float:
        return min(self.class_p, self.label_p, self.confidence_p)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def shift_tests(reference: np.ndarray, traffic: np.ndarray, alpha: float = ALPHA) -> HeadTest:
    """Softmax outputs (N, C) of the reference and of the traffic -> the three tests and the verdict."""
    from scipy.stats import chi2_contingency, ks_2samp

    classes = reference.shape[1]
    class_p = min(1.0, classes * min(ks_2samp(reference[:, c], traffic[:, c]).pvalue for c in range(classes)))
    counts = np.stack(
        [np.bincount(reference.argmax(1), minlength=classes), np.bincount(traffic.argmax(1), minlength=classes)]
    )
    seen = counts.sum(0) > 0  # a class neither side predicted carries no information (and breaks the test)
    label_p = float(chi2_contingency(counts[:, seen])[1]) if seen.sum() > 1 else 1.0
    confidence_p = float(ks_2samp(reference.max(1), traffic.max(1)).pvalue)
    drift = bool(min(class_p, label_p, confidence_p) < alpha)
    return HeadTest(len(traffic), float(class_p), label_p, confidence_p, drift)


def samples_needed(reference: np.ndarray, traffic: np.ndarray, alpha: float) -> int | None:
    for n in PREFIXES:
        if n > len(traffic):
            break
        if shift_tests(reference, traffic[:n], alpha).drift:
            return n
    return len(traffic) if shift_tests(reference, traffic, alpha).drift else None


def reference_outputs(run_dir: Path, images: int = REFERENCE_IMAGES) -> dict[str, np.ndarray]:
    """Per head, the softmax outputs of the run's held-out test images, through the run's verified artifact.

    Every head is scored on the test images of every dataset the run was trained on (up to `images` each): a
    model serving several datasets sees their mixture, and each head answers for every image it is sent."""
    from transferkit.data import DatasetSpec, load_dataset
    from transferkit.manifest import read_manifest
    from transferkit.runs import load_run
    from transferkit.runtimes.selection import load_runtime

    run = load_run(run_dir)
    manifest = read_manifest(run.export_dir)
    if not manifest.servable():
        raise TransferkitError(f"{run_dir}: no verified artifact to score the reference with; run transferkit export")
    runtime = load_runtime("auto", run.export_dir, manifest, check_files=True)
    outputs: dict[str, list[np.ndarray]] = {}
    for dataset in run.labels.datasets:
        spec = run.labels.specs.get(dataset) or dataset
        pixels = load_dataset(DatasetSpec.parse(spec, with_head=False), run.preprocessing, limit=images).test.images
        for start in range(0, len(pixels), 256):
            batch = run.preprocessing.normalize_numpy(pixels[start : start + 256])
            for head, logits in runtime.run(batch).items():
                outputs.setdefault(head, []).append(softmax(logits))
    return {head: np.concatenate(parts) for head, parts in outputs.items()}


def traffic_rows(traffic_dir: Path, model: str | None, since: dt.datetime | None):
    """The captured rows to test, oldest first: one model's (named, or the only one captured)."""
    import pyarrow.compute as pc

    from transferkit.traffic import read_capture

    table = read_capture(traffic_dir)
    if table is None:
        raise DataError(f"{traffic_dir}: no captured traffic (part-*.parquet); serve with --capture {traffic_dir}")
    models = sorted(set(table.column("model").to_pylist()))
    if model is None and len(models) > 1:
        raise DataError(f"{traffic_dir} holds traffic of {models}; name one with --model")
    model = model or models[0]
    table = table.filter(pc.equal(table.column("model"), model))
    if table.num_rows == 0:
        raise DataError(f"{traffic_dir}: no captured rows of model {model!r}; it holds {models}")
    if since is not None:
        table = table.filter(pc.greater_equal(table.column("time"), since))
    return model, table.sort_by("time")


def run_drift(
    run_dir: str | Path,
    traffic_dir: str | Path,
    model: str | None = None,
    since: dt.datetime | None = None,
    window: int = 0,
    alpha: float = ALPHA,
    reference_images: int = REFERENCE_IMAGES,
) -> dict[str, Any]:
    """The drift report: per window (the whole traffic when `window` is 0) and head, the tests and verdicts."""
    from transferkit.traffic import logits_of

    if not 0 < alpha < 1:
        raise TransferkitError(f"--alpha must be between 0 and 1, got {alpha}")
    reference = reference_outputs(Path(run_dir), reference_images)
    model, table = traffic_rows(Path(traffic_dir), model, since)
    heads = [h for h in reference if f"{h}_logits" in table.column_names]
    if not heads:
        raise DataError(f"the captured rows have none of the run's heads {sorted(reference)}; is it the same model?")
    size = window or table.num_rows
    windows = []
    for start in range(0, table.num_rows, size):
        part = table.slice(start, size)
        if windows and part.num_rows < min(size, 20):  # a short last window would be judged on a handful of rows
            break
        times = part.column("time").to_pylist()
        results = {}
        for head in heads:
            traffic = softmax(logits_of(part, head))
            result = shift_tests(reference[head], traffic, alpha)
            if result.drift:
                result.needed = samples_needed(reference[head], traffic, alpha)
            results[head] = result
        windows.append(
            {
                "start": times[0].isoformat(),
                "end": times[-1].isoformat(),
                "rows": part.num_rows,
                "heads": {h: {**dataclasses.asdict(r), "p": r.p} for h, r in results.items()},
                "drift": any(r.drift for r in results.values()),
            }
        )
    return {
        "run": str(Path(run_dir).resolve()),
        "traffic": str(Path(traffic_dir).resolve()),
        "model": model,
        "alpha": alpha,
        "reference_rows": {h: len(v) for h, v in reference.items()},
        "tests": "per head: KS per class (Bonferroni), chi-square of top-1 counts, KS of top-1 confidence",
        "windows": windows,
        "drift": bool(windows and windows[-1]["drift"]),
    }


def format_drift_table(report: dict[str, Any]) -> str:
    lines = [
        f"{'window':<42} {'head':<16} {'rows':>6} {'p class':>9} {'p label':>9} {'p conf':>9} {'verdict':<8} needed"
    ]
    for w in report["windows"]:
        span = f"{w['start'][:19]} .. {w['end'][11:19]}"
        for head, r in w["heads"].items():
            verdict = "DRIFT" if r["drift"] else "ok"
            needed = "" if r["needed"] is None else str(r["needed"])
            lines.append(
                f"{span:<42} {head:<16} {r['rows']:>6} {_p(r['class_p'])} {_p(r['label_p'])} {_p(r['confidence_p'])} "
                f"{verdict:<8} {needed}"
            )
    lines.append(
        f"verdict: {'DRIFT' if report['drift'] else 'no drift'} in the newest window (alpha {report['alpha']})"
    )
    return "\n".join(lines)


def _p(value: float) -> str:
    return f"{value:>9.2g}" if value >= 1e-99 or value == 0 else f"{'<1e-99':>9}"


def write_drift_report(report: dict[str, Any], out: Path) -> Path:
    """drift.json and drift.md (the table) in `out`, written atomically."""
    from transferkit.utils import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "drift.json", report)
    text = f"# Drift: {report['model']}\n\nRun {report['run']}, traffic {report['traffic']}. {report['tests']}.\n\n"
    atomic_write_text(out / "drift.md", text + "```\n" + format_drift_table(report) + "\n```\n")
    return out


__all__ = ["ALPHA", "HeadTest", "format_drift_table", "run_drift", "shift_tests", "write_drift_report"]
