"""The export summary the CLI prints: one row per format and head, then where things are.

format  status  precision  size    head    max|Δ|   top-1 agree  acc torch  acc format  Δacc pts  export s
------  ------  ---------  ------  ------  -------  -----------  ---------  ----------  --------  --------
onnx    passed  fp32       8.9 MB  digits  1.9e-06  100.0%       97.3%      97.3%       +0.00     11.2
"""
from __future__ import annotations

from transferkit.export.pipeline import ExportResult, FormatResult

COLUMNS = ("format", "status", "precision", "size", "head", "max|Δ|", "top-1 agree", "acc torch", "acc format",
           "Δacc pts", "export s")  # fmt: skip


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _rows(r: FormatResult) -> list[list[str]]:
    """One row per head; format, status, size and time only on the first."""
    name = r.format if r.requested else f"{r.format} (dep)"
    timing = f"{r.export_seconds:.1f}" if r.export_seconds is not None else "-"
    first = [name, r.status, r.precision, _size(r.bytes)]
    heads = (r.verification or {}).get("heads") or {}
    if not heads:
        return [first + ["-"] * 6 + [timing]]
    out = []
    for i, (head, h) in enumerate(heads.items()):
        stats = [
            f"{h['max_abs_diff']:.1e}",
            f"{h['top1_agreement']:.1%}",
            f"{h['accuracy_pytorch']:.1%}",
            f"{h['accuracy_format']:.1%}",
            f"{h['accuracy_delta_points']:+.2f}",
        ]
        out.append((first if i == 0 else [""] * 4) + [head] + stats + [timing if i == 0 else ""])
    return out


def format_export_table(result: ExportResult) -> str:
    """A fixed-width table of every format, the reasons for failures, and the paths and BentoML tag."""
    rows = [list(COLUMNS)] + [row for r in result.formats.values() for row in _rows(r)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in result.formats.values():
        if r.error:
            lines.append(f"{r.format}: {r.error}")
    lines.append(f"export dir: {result.export_dir}")
    lines.append(f"manifest:   {result.manifest_path}")
    lines.append(f"verify:     {result.verify_path}")
    if result.bentoml_tag:
        lines.append(f"BentoML model: {result.bentoml_tag}")
    elif result.bentoml_error:
        lines.append(result.bentoml_error)
    elif any(r.servable for r in result.formats.values()):
        lines.append("BentoML model: not stored (store=False)")
    else:
        lines.append("BentoML model: none (no format passed verification)")
    return "\n".join(lines)
