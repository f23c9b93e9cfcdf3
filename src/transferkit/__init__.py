"""transferkit: fine-tune one pretrained backbone on many datasets, export verified artifacts, serve them.

The Python API is what the commands call (docs/api.md has a runnable example):

    train(**options) -> run folder        export(run, formats, precision) -> ExportResult
    evaluate(run) -> EvalResult           start_server(run) -> ServerHandle (a context manager); serve(run)
    score(run, inputs, out) -> summary    register_dataset(name, loader, description)

Every function imports what it needs when called: `import transferkit` stays light (the serving image has no
torch), and each takes the same options as its command's flags.
"""

from __future__ import annotations

from typing import Any

from transferkit.version import __version__

__all__ = ["__version__", "evaluate", "export", "register_dataset", "score", "serve", "start_server", "train"]


def train(config: Any = None, **options: Any):
    """Fine-tune (`transferkit train`): a TrainConfig, or its fields as keywords (data=["mnist", "digits"],
    image_size=32, epochs=2, out="runs/x", ...) -> the run folder. A bad option is refused before training."""
    from transferkit.config import config_from_dict
    from transferkit.training import train as train_run

    if config is not None and options:
        raise TypeError("pass a TrainConfig or keyword options, not both")
    return train_run(config if config is not None else config_from_dict(options, source="transferkit.train"))


def export(
    run,
    formats=("onnx",),
    precision="fp32",
    *,
    verify_images: int | str = "auto",
    device: str = "cpu",
    store: bool = True,
    data=None,
    **options: Any,
):
    """Export, verify against PyTorch and store (`transferkit export`) -> ExportResult; `options` are
    ExportOptions fields (int8_budget_s=120, slower_int8="offer", ...)."""
    from transferkit.export import export_run
    from transferkit.export.job import ExportOptions

    return export_run(
        run,
        formats,
        precision,
        verify_images=verify_images,
        device=device,
        store=store,
        options=ExportOptions(**options),
        data=list(data) if data else None,
    )


def evaluate(run, data=None, split: str = "test", **robustness: Any):
    """Every head on every dataset it can score (`transferkit eval`) -> EvalResult (eval.json, report.md);
    `robustness` are RobustnessOptions fields (corruptions="all", reference=RUN, attack="pgd", eps="1/255,...")."""
    from transferkit.evaluation import evaluate_run
    from transferkit.evaluation.robust_options import RobustnessOptions

    options = RobustnessOptions(**robustness)  # a bad option is refused before anything loads
    return evaluate_run(run, extra_data=list(data) if data else None, split=split, robustness=options)


def start_server(run, **settings: Any):
    """`transferkit serve` in the background, ready when it returns -> ServerHandle (use it in a `with`);
    settings as `serve`'s flags (workers=1, max_batch=16, api_key_file=..., port=...)."""
    from transferkit.serving.harness import start_server as start

    return start(run, **settings)


def serve(run, **settings: Any) -> int:
    """`transferkit serve` in the foreground until SIGTERM or Ctrl-C -> exit status."""
    from transferkit.serving.server import serve as serve_run

    return serve_run(run, **settings)


def score(run, inputs, out=None, **options):
    """Score many images with a run's verified artifact (transferkit.scoring.job.score; `transferkit score`)."""
    from transferkit.scoring.job import score as _score

    return _score(run, inputs, out, **options)


def register_dataset(name: str, loader, description: str) -> None:
    """Make `name` usable in `data=[...]`: `loader()` -> ({"train": (uint8 images (N,H,W) or (N,H,W,3), int64
    labels), "val": ..., "test": ...}, class names). In this process: a subprocess needs it registered too."""
    from transferkit.data.registry import register_dataset as register

    register(name, loader, description)
