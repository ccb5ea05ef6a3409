"""Digests: of JSON-able settings (shard names, dataset versions), and of the project's own source
files that a module imports, directly or through others - a stage's code dependencies (dvc.yaml
`deps` must cover them) and the code a training run depends on (part of its resume fingerprint).
Imports are found by reading import statements, not by running anything."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path
from typing import Any

PACKAGE = "cmhash"
ROOT = Path(__file__).parent  # the cmhash package folder


def digest(*parts: Any) -> str:
    """SHA-256 of JSON-serialisable parts, in order (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _file(module: str) -> Path | None:
    """cmhash.a.b -> <package>/a/b.py or <package>/a/b/__init__.py; None for a name that is not a module."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> set[str]:
    """cmhash modules named by `path`'s import statements (`from a import b` may name module a.b)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if _file(name) is not None}


def closure(module: str) -> list[Path]:
    """Every source file of `module` and of the cmhash modules it imports, transitively, with the
    `__init__.py` of each package on the way (Python runs them on import). Sorted."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _file(name)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        todo += sorted(_imports(path, name))
    return sorted(set(seen.values()))


def code_digest(module: str) -> str:
    """SHA-256 of the source files `module` imports (closure), by path relative to the package."""
    h = hashlib.sha256()
    for f in closure(module):
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
