"""Shared fixtures: a tiny but complete params.yaml (tiny open_clip config, a few dozen pairs)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    """The repository's params.yaml shrunk to test size; same keys, so tests catch missing ones."""
    p = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    p["device"] = "cpu"
    p["bits"] = [16, 32]
    p["data"]["name"] = "demo"
    p["data"]["demo"].update(n_items=72, image_size=32, query=12, train=36, val=12)
    p["clip"].update(model="cmhash-tiny", pretrained="none", batch_size=32, num_workers=0)
    p["model"].update(d_model=None, nhead=2, num_layers=1, dim_feedforward=64, hash_hidden=64)
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
