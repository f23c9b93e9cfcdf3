"""Export a trained run to verified, servable artifacts.

    result = export_run("runs/mnist", formats=("onnx",))   # RUN/export/{model.onnx, verify.json, manifest.json}
    print(format_export_table(result)); sys.exit(0 if result.ok else 1)

Every format is compared with PyTorch on held-out images (`verify`) before it is marked servable, and the
servable files are saved to the BentoML model store (`store`), where the service loads them from.
"""
from transferkit.export.formats import (
    EXPORT_FAILED,
    FORMATS,
    PASSED,
    STATUSES,
    UNAVAILABLE,
    VERIFY_FAILED,
    ExportFormat,
)
from transferkit.export.pipeline import ExportResult, FormatResult, export_run, verify_export
from transferkit.export.table import format_export_table
from transferkit.export.verify import TOLERANCES, Tolerance

__all__ = [
    "EXPORT_FAILED",
    "FORMATS",
    "PASSED",
    "STATUSES",
    "TOLERANCES",
    "UNAVAILABLE",
    "VERIFY_FAILED",
    "ExportFormat",
    "ExportResult",
    "FormatResult",
    "Tolerance",
    "export_run",
    "format_export_table",
    "verify_export",
]
