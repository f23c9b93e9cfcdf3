"""`transferkit drift`'s report: drift.json, drift.md (the table) and two plots, written atomically.

drift_p.png        per head (and the feature test), the smallest p-value of each window over time, against alpha
confidence.png     per head, the top-1 confidence of the reference and of the newest window
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transferkit.evaluation.report import _save_figure
from transferkit.utils import atomic_write_json, atomic_write_text


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
        if w.get("mmd"):
            m = w["mmd"]
            lines.append(
                f"{span:<42} {'(features)':<16} {m['rows']:>6} MMD^2 {m['mmd2']:.3g}, p {m['p']:.2g} "
                f"({m['reference_rows']} reference rows) {'DRIFT' if m['drift'] else 'ok'}"
            )
    lines.append(
        f"verdict: {'DRIFT' if report['drift'] else 'no drift'} in the newest window (alpha {report['alpha']})"
    )
    return "\n".join(lines)


def _p(value: float) -> str:
    return f"{value:>9.2g}" if value >= 1e-99 or value == 0 else f"{'<1e-99':>9}"


def write_drift_report(report: dict[str, Any], out: Path) -> Path:
    """drift.json, drift.md and the plots in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "drift.json", report)
    plots = _plots(report, out)
    text = (
        f"# Drift: {report['model']}\n\nRun {report['run']}, traffic {report['traffic']}. {report['tests']}. "
        f"Reference: {report['reference']}.\n\n```\n{format_drift_table(report)}\n```\n"
    )
    text += "".join(f"\n![{name}]({name})\n" for name in plots)
    atomic_write_text(out / "drift.md", text)
    return out


def _plots(report: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = report["windows"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    series = {h: [max(w["heads"][h]["p"], 1e-300) for w in windows] for h in windows[0]["heads"]}
    if any(w.get("mmd") for w in windows):
        series["features (MMD)"] = [w["mmd"]["p"] if w.get("mmd") else np.nan for w in windows]
    for name, ps in series.items():
        ax.plot(range(1, len(ps) + 1), ps, marker="o", label=name)
    ax.axhline(report["alpha"], color="red", linestyle="--", label=f"alpha {report['alpha']}")
    ax.set(yscale="log", xlabel="window (oldest first)", ylabel="smallest corrected p", title="Drift per window")
    ax.legend(fontsize=8)
    names = [_save_figure(fig, out / "drift_p.png")]
    heads = report.get("confidence") or {}
    if heads:
        fig, axes = plt.subplots(1, len(heads), figsize=(4 * len(heads), 3), squeeze=False)
        for ax, (head, h) in zip(axes[0], heads.items()):
            centres = (np.asarray(h["edges"][:-1]) + np.asarray(h["edges"][1:])) / 2
            width = h["edges"][1] - h["edges"][0]
            ax.bar(centres, h["reference"], width, alpha=0.5, label="reference (test images)")
            ax.bar(centres, h["newest"], width, alpha=0.5, label="newest window")
            ax.set(title=head, xlabel="top-1 confidence", ylabel="share")
            ax.legend(fontsize=7)
        names.append(_save_figure(fig, out / "confidence.png"))
    return names


__all__ = ["format_drift_table", "write_drift_report"]
