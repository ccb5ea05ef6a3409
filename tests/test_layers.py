"""The package map of docs/development.md, enforced: each layer imports only layers below it, and
the top of src/cmhash holds only the few modules every layer shares."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cmhash"

# Level of each layer (a top-level module or a package); a layer imports only lower levels.
LEVELS = {
    "errors": 0,
    "io": 1, "digests": 1,
    "config": 2,
    "runtime": 3, "data": 3, "evaluation": 3,
    "features": 4, "models": 4, "losses": 4, "report": 4,
    "training": 5, "baselines": 5, "search": 5,
    "pipeline": 6, "serve": 6,
    "cli": 7, "__main__": 8,
}
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "cli.py", "errors.py", "io.py", "digests.py", "models.py", "losses.py"}


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def imported_layers(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        found |= {layer_of(n) for n in names if n.startswith("cmhash.")}
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", sources(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_a_layer_imports_only_layers_below_it(path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert own in LEVELS, f"{own} is not on the package map (tests/test_layers.py LEVELS, docs/development.md)"
    upward = sorted(layer for layer in imported_layers(path) - {own} if LEVELS[layer] >= LEVELS[own])
    assert upward == [], f"{path.relative_to(PACKAGE)} ({own}, level {LEVELS[own]}) imports {upward}, which are not below it"


def test_the_top_level_holds_only_shared_modules():
    assert {p.name for p in PACKAGE.glob("*.py")} == TOP_LEVEL_FILES


def test_the_map_in_the_docs_names_every_layer():
    text = (PACKAGE.parents[1] / "docs" / "development.md").read_text(encoding="utf-8")
    missing = [layer for layer in LEVELS if f"`{layer}" not in text]
    assert missing == []
