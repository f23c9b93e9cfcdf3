"""Fixtures for export tests (the session's exported tiny run is `exported`, in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.export.tiny import make_tiny_run


@pytest.fixture
def fresh_run(tmp_path):
    """A tiny run that has not been exported."""
    return make_tiny_run(tmp_path / "fresh")
