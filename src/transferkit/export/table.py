"""Plain-text output of the export commands: the export summary the CLI prints (one row per format and head,
then where things are), the fixed-width table it and `transferkit benchmark` share, one-line error messages.

format     status  precision  size    head    max|Δ|   top-1 agree  acc torch  acc format  drop pts  bound  images  ...
---------  ------  ---------  ------  ------  -------  -----------  ---------  ----------  --------  -----  ------  ---
onnx       passed  fp32       8.9 MB  digits  1.9e-06  100.0%       97.3%      97.3%       +0.00     -      270     ...
onnx-int8  passed  int8       2.9 MB  digits  ...      99.3%        97.3%      97.6%       -0.37     +0.61  270     ...

`drop pts`: accuracy lost against PyTorch (negative: gained); `bound`: its one-sided upper confidence bound,
for the precisions judged on it (evaluation/paired.py); `corr.`: the same comparison on the gate's corrupted sample
(export/verify_corrupted.py), then the export's seconds.

Imports nothing from the rest of export at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transferkit.export.results import ExportResult, FormatResult

COLUMNS = (
    "format",
    "status",
    "precision",
    "size",
    "head",
    "max|Δ|",
    "top-1 agree",
    "acc torch",
    "acc format",
    "drop pts",
    "bound",
    "images",
    "corr. agree",
    "corr. Δacc",
    "export s",
)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, a dashed rule under the header, no trailing spaces."""
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
        return [first + ["-"] * 10 + [timing]]
    corrupted = ((r.verification or {}).get("robustness") or {}).get("heads") or {}
    out = []
    for i, (head, h) in enumerate(heads.items()):
        c = corrupted.get(head)
        stats = [
            f"{h['max_abs_diff']:.1e}",
            f"{h['top1_agreement']:.1%}",
            f"{h['accuracy_pytorch']:.1%}",
            f"{h['accuracy_format']:.1%}",
            f"{-h['accuracy_delta_points']:+.2f}",
            f"{h['drop_upper_points']:+.2f}" if h.get("drop_upper_points") is not None else "-",
            str(h["images"]),
            f"{c['top1_agreement']:.1%}" if c else "-",
            f"{c['accuracy_delta_points']:+.2f}" if c else "-",
        ]
        out.append((first if i == 0 else [""] * 4) + [head] + stats + [timing if i == 0 else ""])
    return out


def format_export_table(result: ExportResult) -> str:
    """A fixed-width table of every format, the reasons for failures, and the paths and BentoML tag."""
    lines = [text_table(COLUMNS, [row for r in result.formats.values() for row in _rows(r)])]
    for r in result.formats.values():
        if r.error:
            lines.append(f"{r.format}: {r.error}")
        if (r.verification or {}).get("note"):
            lines.append(f"{r.format}: {r.verification['note']}")
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
