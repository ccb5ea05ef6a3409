"""Code dependencies: every cmhash source file a stage imports is a dvc.yaml dep of that stage
(cmhash.digests.closure reads the imports), config checking stays free of torch, and the training
code digest (resume fingerprint) follows the training code."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

from cmhash import digests
from cmhash.config.choices.archs import ARCHS
from cmhash.config.choices.datasets import DATASETS
from cmhash.config.choices.losses import LOSSES
from cmhash.config.choices.optimizers import OPTIMIZERS
from cmhash.config.choices.schedules import SCHEDULES
from cmhash.digests import closure

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "cmhash"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def rel(paths: list[Path], root: Path = PACKAGE) -> set[str]:
    return {p.relative_to(root).as_posix() for p in paths}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_source_file_is_a_stage_dep(stage):
    """Each file of the stage module's import closure is a dep, or inside a dep folder."""
    deps = [Path(d) for d in STAGES[stage]["deps"]]
    missing = []
    for path in closure(f"cmhash.pipeline.{stage}"):
        path = path.relative_to(REPO)
        if not any(path == dep or dep in path.parents for dep in deps):
            missing.append(path.as_posix())
    assert missing == [], f"dvc.yaml stage {stage} lacks deps {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_source_dep_exists(stage):
    """A dep path that does not exist (a moved module) would break `dvc repro`."""
    for dep in STAGES[stage]["deps"]:
        if dep.startswith("src/"):
            assert (REPO / dep).exists(), f"{stage}: dep {dep} does not exist"


def stage_files(stage: str) -> set[Path]:
    """The stage module's import closure plus the implementations its registries load by name."""
    files = set(closure(f"cmhash.pipeline.{stage}"))
    for registry in LOADED_BY.get(stage, []):
        for entry in registry.entries():
            files |= set(closure(entry.impl.partition(":")[0]))
    return {path.relative_to(REPO) for path in files}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_source_dep_is_code_the_stage_runs(stage):
    """No needless re-run: a listed source file is in the stage's closure, and a listed folder holds
    only closure files (its .py files; data files such as CLIP configs are listed on purpose)."""
    files = stage_files(stage)
    for dep in STAGES[stage]["deps"]:
        path = Path(dep)
        if not dep.startswith("src/") or dep.endswith("clip_configs"):
            continue
        inside = {p.relative_to(REPO) for p in (REPO / path).rglob("*.py")} if (REPO / path).is_dir() else {path}
        assert inside <= files, f"{stage}: dep {dep} holds {sorted(map(str, inside - files))}, which the stage does not import"


# Registries whose implementations a stage loads by name ("module:attribute", imported on first
# use, so invisible to an import scan unless a module imports them too).
LOADED_BY = {"prepare": [DATASETS], "train_fusion": [LOSSES, ARCHS, SCHEDULES, OPTIMIZERS], "train_hash": [LOSSES, ARCHS, SCHEDULES, OPTIMIZERS],
             "evaluate": [ARCHS]}


@pytest.mark.parametrize("stage", sorted(LOADED_BY))
def test_registered_implementations_are_in_the_stage_closure(stage):
    """A loss, architecture, schedule or dataset chosen in params.yaml runs code of the stage's
    closure, so its module is a code dep too."""
    files = rel(closure(f"cmhash.pipeline.{stage}"))
    for registry in LOADED_BY[stage]:
        for entry in registry.entries():
            module = entry.impl.partition(":")[0]
            if module.split(".")[0] != "cmhash":
                continue  # torch.optim
            name = module.removeprefix("cmhash.").replace(".", "/")
            assert {f"{name}.py", f"{name}/__init__.py"} & files, f"{stage}: {entry.impl} ({registry.kind} {entry.name}) not in its closure"


def test_prepare_closure():
    """prepare reaches the dataset importers and config, and none of the torch model code."""
    files = rel(closure("cmhash.pipeline.prepare"))
    assert {"pipeline/prepare.py", "config/schema.py", "data/datasets/demo.py", "__init__.py", "pipeline/__init__.py"} <= files
    assert not files & {"models.py", "losses.py", "features/clip.py", "training/task.py"}


def test_closure_is_sorted_existing_files_under_the_package():
    """closure() returns sorted, distinct, existing files of the package; nothing for a non-cmhash module."""
    files = closure("cmhash.pipeline.train_hash")
    assert files == sorted(set(files))
    assert all(f.is_file() and PACKAGE in f.parents for f in files)
    assert closure("cmhash.nope") == [] and closure("numpy") == []


def test_closure_follows_relative_and_from_imports(tmp_path, monkeypatch):
    """On a synthetic package: `from . import x`, `from .sub import y`, `import cmhash.a` and a
    package's own __init__ are followed; standard-library and unrelated modules are not."""
    pkg = tmp_path / "cmhash"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import os\nfrom . import b\nfrom .sub import c\n")
    (pkg / "b.py").write_text("import cmhash.d\n")
    (pkg / "d.py").write_text("from cmhash.sub.c import VALUE\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("VALUE = 1\n")
    (pkg / "unused.py").write_text("")
    monkeypatch.setattr(digests, "ROOT", pkg)
    assert rel(closure("cmhash.a"), pkg) == {"__init__.py", "a.py", "b.py", "d.py", "sub/__init__.py", "sub/c.py"}


def test_config_checking_imports_no_torch():
    """No file of cmhash.config.schema's closure imports torch: a config mistake is reported before any
    heavy import (what keeps `error: ...` instant)."""
    heavy = {"torch", "open_clip", "dvclive", "faiss"}
    for path in closure("cmhash.config.schema"):
        assert not imported_roots(path) & heavy, f"{path.relative_to(PACKAGE)} imports {imported_roots(path) & heavy}"


def test_code_digest_follows_the_training_code(tmp_path, monkeypatch):
    """code_digest() depends on the training closure's paths (relative) and bytes: the same on a
    copy of the package, different after an edit of a training file, unchanged by an edit
    elsewhere."""
    def code_digest():
        return digests.code_digest("cmhash.training.task")

    original = code_digest()
    copy = tmp_path / "cmhash"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(digests, "ROOT", copy)
    assert code_digest() == original

    training = rel(closure("cmhash.training.task"), copy)
    assert {"training/engine.py", "losses.py", "models.py", "config/schema.py"} <= training and "cli.py" not in training
    for name in ("cli.py", "search/commands.py"):  # not training code
        (copy / name).write_text((copy / name).read_text() + "\n# edited\n")
    assert code_digest() == original
    for name in ("training/engine.py", "losses.py"):
        path = copy / name
        text = path.read_text()
        path.write_text(text + "\n# edited\n")
        assert code_digest() != original, name
        path.write_text(text)
        assert code_digest() == original
