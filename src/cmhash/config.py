"""params.yaml: one dict of every knob. Stages read it here; the CLI may override paths only."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cmhash.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (run from the repository root or pass --params)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of parameters")
    return params


def get(params: dict[str, Any], dotted: str) -> Any:
    """params["a"]["b"] for "a.b", with a one-line error naming the missing key."""
    node: Any = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise ConfigError(f"params.yaml has no `{dotted}`; add it (see the README's params reference)")
        node = node[key]
    return node


def choose(value: str, valid: dict | tuple | list, what: str) -> str:
    """Check `value` is one of `valid`, else a one-line error listing the valid names."""
    if value not in valid:
        raise ConfigError(f"unknown {what} '{value}'; choose one of: {', '.join(sorted(valid))}")
    return value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
