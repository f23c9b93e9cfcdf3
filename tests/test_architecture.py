"""docs/architecture.md stays true: every module it names exists, and every module of the package is named."""

from __future__ import annotations

import re
from pathlib import Path

import transferkit

PACKAGE_DIR = Path(transferkit.__file__).resolve().parent
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
LEFT_OUT = {"__init__.py", "__main__.py"}  # package markers and `python -m transferkit`, not modules of their own


def documented_modules() -> set[str]:
    """Paths relative to the package from the doc's module table: `x.py` rows, and the `y.py` a `pkg/` row lists."""
    found = set()
    for line in DOC.read_text().splitlines():
        cells = line.split("|")
        if len(cells) < 4 or not (first := re.fullmatch(r"\s*`([\w/.]+)`\s*", cells[1])):
            continue
        name = first.group(1)
        if name.endswith(".py"):
            found.add(name)
        elif name.endswith("/"):
            found |= {name + module for module in re.findall(r"`(\w+\.py)`", cells[2])}
    return found


def test_the_architecture_note_names_every_module_and_only_real_ones():
    actual = {p.relative_to(PACKAGE_DIR).as_posix() for p in PACKAGE_DIR.rglob("*.py") if p.name not in LEFT_OUT}
    documented = documented_modules()
    assert len(documented) > 40  # the table was read
    assert not documented - actual, f"docs/architecture.md names modules that do not exist: {documented - actual}"
    assert not actual - documented, f"modules missing from docs/architecture.md: {actual - documented}"
