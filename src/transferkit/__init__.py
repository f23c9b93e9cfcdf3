"""transferkit: fine-tune one pretrained backbone on many datasets, export verified artifacts, serve them."""

from transferkit.version import __version__

__all__ = ["__version__", "score"]


def score(run, inputs, out=None, **options):
    """Score many images with a run's verified artifact (transferkit.scoring.job.score; `transferkit score`)."""
    from transferkit.scoring.job import score as _score

    return _score(run, inputs, out, **options)
