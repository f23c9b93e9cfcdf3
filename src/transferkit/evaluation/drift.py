"""`transferkit drift RUN --traffic DIR`: has the traffic a served model sees moved away from its training data?

Black-box shift detection on the model's own outputs, the strongest cheap detector in Rabanser et al., "Failing
Loudly" (NeurIPS 2019): per head, the softmax outputs of the run's held-out test images (the reference: those
the verified artifact that serves gave at export, drift_reference.py, or scored now for older exports) against
those of the captured traffic (serve --capture), with transferkit/shift.py's three tests (KS per class,
Bonferroni-corrected; chi-square of the predicted labels; KS of the top-1 confidence). A head drifts when any of its three corrected p-values is below --alpha; the verdict is the head's or the
run's. Windows (`--window N`: consecutive runs of N captured rows by time, `--since` to drop older rows) give
one verdict each; the newest window's verdict is the command's exit code (3: drift), for schedulers and CI.
For a drifting head the report says how many captured rows it took: the smallest prefix of the window (50, 100,
200, ... rows) at which the same tests already fall below --alpha.

`--mmd` adds the representation-level test per window: kernel MMD on the backbone's features (evaluation/mmd.py),
computed with the run's PyTorch model, since the served artifact outputs logits only; a window drifts when it
or any head does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import DataError, TransferkitError
from transferkit.shift import ALPHA, HeadTest, samples_needed, shift_tests, softmax

REFERENCE_IMAGES = 2000  # held-out test images per dataset scored for the reference


def reference_outputs(run_dir: Path, images: int = REFERENCE_IMAGES) -> tuple[dict[str, np.ndarray], str]:
    """Per head, the softmax outputs of the run's held-out test images, through the run's verified artifact: the
    ones stored with it at export (drift_reference.py), else scored now on up to `images` test images a dataset.

    Every head is scored on the test images of every dataset the run was trained on (up to `images` each): a
    model serving several datasets sees their mixture, and each head answers for every image it is sent."""
    from transferkit.drift_reference import load_reference
    from transferkit.evaluation.mmd import held_out_images
    from transferkit.manifest import read_manifest
    from transferkit.runs import load_run
    from transferkit.runtimes.selection import load_runtime

    run = load_run(run_dir)
    manifest = read_manifest(run.export_dir)
    if not manifest.servable():
        raise TransferkitError(f"{run_dir}: no verified artifact to score the reference with; run transferkit export")
    runtime = load_runtime("auto", run.export_dir, manifest, check_files=True)
    stored = load_reference(run.export_dir, manifest, manifest.artifacts[runtime.artifact])
    if stored is not None:  # the artifact's outputs on the gate's held-out images, kept at export
        return stored, f"stored with {runtime.artifact} at export"
    outputs: dict[str, list[np.ndarray]] = {}
    for pixels in held_out_images(run, images):
        for start in range(0, len(pixels), 256):
            batch = run.preprocessing.normalize_numpy(pixels[start : start + 256])
            for head, logits in runtime.run(batch).items():
                outputs.setdefault(head, []).append(softmax(logits))
    return {head: np.concatenate(parts) for head, parts in outputs.items()}, f"scored now through {runtime.artifact}"


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
    mmd: bool = False,
) -> dict[str, Any]:
    """The drift report: per window (the whole traffic when `window` is 0) and head, the tests and verdicts;
    with `mmd`, also per window the kernel MMD test on the backbone's features (evaluation/mmd.py)."""
    from transferkit.traffic import logits_of

    if not 0 < alpha < 1:
        raise TransferkitError(f"--alpha must be between 0 and 1, got {alpha}")
    reference, reference_source = reference_outputs(Path(run_dir), reference_images)
    model, table = traffic_rows(Path(traffic_dir), model, since)
    heads = [h for h in reference if f"{h}_logits" in table.column_names]
    if not heads:
        raise DataError(f"the captured rows have none of the run's heads {sorted(reference)}; is it the same model?")
    features = None
    if mmd:
        from transferkit.evaluation.mmd import FeatureShift

        features = FeatureShift(run_dir, reference_images)
    size = window or table.num_rows
    windows = []
    for start in range(0, table.num_rows, size):
        part = table.slice(start, size)
        if windows and part.num_rows < min(size, 20):  # a short last window would be judged on a handful of rows
            break
        times = part.column("time").to_pylist()
        results, newest = {}, {}
        for head in heads:
            traffic = newest[head] = softmax(logits_of(part, head))
            result = shift_tests(reference[head], traffic, alpha)
            if result.drift:
                result.needed = samples_needed(reference[head], traffic, alpha)
            results[head] = result
        feature_test = features.test(part) if features is not None else None
        feature_drift = feature_test is not None and feature_test.p < alpha
        windows.append(
            {
                "start": times[0].isoformat(),
                "end": times[-1].isoformat(),
                "rows": part.num_rows,
                "heads": {h: {**dataclasses.asdict(r), "p": r.p} for h, r in results.items()},
                "mmd": None if feature_test is None else {**dataclasses.asdict(feature_test), "drift": feature_drift},
                "drift": any(r.drift for r in results.values()) or feature_drift,
            }
        )
    return {
        "run": str(Path(run_dir).resolve()),
        "traffic": str(Path(traffic_dir).resolve()),
        "model": model,
        "alpha": alpha,
        "reference": reference_source,
        "reference_rows": {h: len(v) for h, v in reference.items()},
        "tests": "per head: KS per class (Bonferroni), chi-square of top-1 counts, KS of top-1 confidence"
        + ("; per window: kernel MMD on the backbone's features (permutation test)" if mmd else ""),
        "windows": windows,
        "drift": bool(windows and windows[-1]["drift"]),
        "confidence": {h: confidence_histograms(reference[h], newest[h]) for h in heads},  # for the report's plot
    }


def confidence_histograms(reference: np.ndarray, traffic: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """The top-1 confidence of both samples as shares per bin of [0, 1]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    share = lambda probs: (np.histogram(probs.max(1), edges)[0] / max(len(probs), 1)).tolist()  # noqa: E731
    return {"edges": edges.tolist(), "reference": share(reference), "newest": share(traffic)}


__all__ = ["ALPHA", "HeadTest", "run_drift", "shift_tests"]
