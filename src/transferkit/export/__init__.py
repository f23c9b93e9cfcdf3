"""Export a trained run to verified, servable artifacts.

    result = export_run("runs/mnist", formats=("onnx",))   # RUN/export/{model.onnx, verify.json, manifest.json}
    print(format_export_table(result)); sys.exit(0 if result.ok else 1)

Every format is checked against PyTorch on held-out images (`verify`) before it is marked servable, and the
servable files are saved to the BentoML model store (`store`), where the service loads them from. The formats
table, status words and tolerances are data in `transferkit.artifact`; `FORMATS` joins them to the exporters.
"""

from transferkit.artifact import (
    EXPORT_FAILED,
    EXPORTED,
    PASSED,
    STATUSES,
    TOLERANCES,
    UNAVAILABLE,
    VERIFY_FAILED,
    Tolerance,
)
from transferkit.export.formats import FORMATS, ExportFormat
from transferkit.export.job import ExportOptions
from transferkit.export.pipeline import export_run, verify_export
from transferkit.export.results import ExportResult, FormatResult
from transferkit.export.table import format_export_table

__all__ = [
    "EXPORTED",
    "EXPORT_FAILED",
    "FORMATS",
    "PASSED",
    "STATUSES",
    "TOLERANCES",
    "UNAVAILABLE",
    "VERIFY_FAILED",
    "ExportFormat",
    "ExportOptions",
    "ExportResult",
    "FormatResult",
    "Tolerance",
    "export_run",
    "format_export_table",
    "verify_export",
]
