"""Fixtures for export tests: a private BentoML store and one exported tiny run per session."""
from __future__ import annotations

import pytest

from tests.export.tiny import exported_tiny_run, make_tiny_run, use_private_bentoml_home


@pytest.fixture(scope="session", autouse=True)
def bentoml_home(tmp_path_factory):
    return use_private_bentoml_home(tmp_path_factory)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(run_dir, ExportResult) for an ONNX export of the tiny two-head run."""
    return exported_tiny_run(tmp_path_factory)


@pytest.fixture
def fresh_run(tmp_path):
    """A tiny run that has not been exported."""
    return make_tiny_run(tmp_path / "fresh")
