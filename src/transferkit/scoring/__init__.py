"""Bulk scoring: `transferkit score RUN --input SRC... --out PREDS` (job.py), the inputs it reads (sources.py),
the one-machine engine (engine.py) and the resumable output (output.py)."""
