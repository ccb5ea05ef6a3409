"""Shared fixtures: a tiny but complete params.yaml (tiny open_clip config, a few dozen pairs),
the `cmhash` command run through Typer's CliRunner, and small synthetic feature files."""

from __future__ import annotations

import copy
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import numpy as np
import pytest
import yaml
from click.testing import Result
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_DIM, SYNTHETIC_CLASSES = 16, 4


def synthetic(n: int, seed: int, dim: int = SYNTHETIC_DIM) -> dict:
    """Pairs whose image and text features both carry their label (fixed per-class prototypes)."""
    protos = np.random.default_rng(0).standard_normal((2, SYNTHETIC_CLASSES, dim))
    rng = np.random.default_rng(seed)
    label = np.eye(SYNTHETIC_CLASSES, dtype=np.uint8)[rng.integers(0, SYNTHETIC_CLASSES, n)]
    noisy = lambda p: (label @ p + 0.7 * rng.standard_normal((n, dim))).astype(np.float32)  # noqa: E731
    return {"image": noisy(protos[0]), "text": noisy(protos[1]), "label": label,
            "clip_model": "synthetic", "pretrained": "none", "random_init": True}


@pytest.fixture
def features_dir(tmp_path: Path) -> Path:
    """train.pkl (48 pairs) and val.pkl (16) of `synthetic` features."""
    from cmhash.io import save_pickle

    folder = tmp_path / "features"
    save_pickle(folder / "train.pkl", synthetic(48, seed=1))
    save_pickle(folder / "val.pkl", synthetic(16, seed=2))
    return folder


@pytest.fixture
def params() -> dict:
    """The repository's params.yaml shrunk to test size; same keys, so tests catch missing ones."""
    return tiny_params()


def tiny_params() -> dict:
    """What the `params` fixture returns, for module-scoped fixtures that cannot use it."""
    p = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    p["device"] = "cpu"
    p["bits"] = [16, 32]
    p["data"]["name"] = "demo"
    p["data"]["demo"].update(n_items=72, image_size=32, query=12, train=36, val=12)
    p["clip"].update(model="cmhash-tiny", pretrained="none", batch_size=32, num_workers=0)
    for arch in ("reference", "cross_attention"):
        p["model"][arch].update(d_model=None, nhead=2, num_layers=1, dim_feedforward=64)
    p["hash_head"]["hidden"] = 64
    p["hash_head"]["init"] = "random"  # most tests train heads without a baselines stage; test_pipeline runs the default
    p["train"].update(batch_size=16, eval_every=1)
    p["train"]["fusion"]["epochs"] = 2
    p["train"]["hash"]["epochs"] = 2
    return p


@pytest.fixture
def params_file(tmp_path: Path, params: dict, monkeypatch) -> Path:
    """`params` written to tmp_path/params.yaml, with tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# ------------------------------------------------------------------ the CLI, for tests that run commands


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """Run `cmhash <args>` through Typer's CliRunner (arguments turned into strings)."""
    from cmhash.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def one_line_error() -> Callable[[Result], str]:
    """The command failed with exit code 1 and exactly one `error: ...` line, no traceback: that line."""
    return _one_line_error


@pytest.fixture
def prepare_and_extract(invoke) -> Callable[[Path], None]:
    """Run `cmhash prepare` and `cmhash extract` with a params file (random-init CLIP, as the tests' params)."""

    def run(params_file: Path) -> None:
        for stage in ("prepare", "extract"):
            result = invoke(stage, "--params", params_file)
            assert result.exit_code == 0, result.output
        assert json.loads((params_file.parent / "metrics/extract.json").read_text())["random_init"] is True

    return run


# ------------------------------------------------------------------ the config schema, for tests derived from it


def with_value(tree: dict, key: str, value: Any) -> dict:
    """A copy of `tree` (raw params) with the dotted `key` set to `value`."""
    tree = copy.deepcopy(tree)
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[last] = value
    return tree


def unpack(annotation: Any) -> tuple[Any, list[Any], bool]:
    """(base type, its constraint metadata, whether None is allowed) of a schema field's annotation;
    nested Annotated[...] (Count = Annotated[StrictInt, Field(ge=1)], ...) is flattened."""
    if get_origin(annotation) in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        base, meta, _ = unpack(inner)
        return base, meta, True
    info = FieldInfo.from_annotation(annotation)
    if info.annotation is annotation:
        return annotation, list(info.metadata), False
    base, meta, optional = unpack(info.annotation)
    return base, [*info.metadata, *meta], optional


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` skip, with one reason, where torch sees no CUDA device (CI)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
