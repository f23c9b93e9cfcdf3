"""transferkit: fine-tune one pretrained backbone on many datasets, export verified artifacts, serve them."""

__version__ = "0.1.0"
