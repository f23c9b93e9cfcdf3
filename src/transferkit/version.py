"""The package version, in a module of its own: modules that record it (manifests, images) import it from here,
not from the package, whose __init__ imports the Python API."""

__version__ = "0.1.0"
