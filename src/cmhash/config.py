"""params.yaml: one dict of every knob. Stages read it here; the CLI may override paths only."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml

from cmhash.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


class Range(NamedTuple):
    """The values a params.yaml number may take: an integer (or any finite number) from `low`
    (excluded when `open_low`) up to `high` (excluded when `open_high`)."""

    integer: bool
    low: float
    open_low: bool = False
    high: float = math.inf
    open_high: bool = True

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or (self.integer and not isinstance(value, int)):
            return False
        try:
            number = float(value)  # also "1e-4", which PyYAML reads as a string (its floats need a dot)
        except (TypeError, ValueError):
            return False
        above = number > self.low if self.open_low else number >= self.low
        below = number < self.high if self.open_high else number <= self.high
        return math.isfinite(number) and above and below

    def check(self, key: str, value: Any, why: str = "") -> Any:
        """`value` (a float unless `integer`), or a one-line ConfigError naming `key` and the range."""
        if not self.holds(value):
            raise ConfigError(f"{key} must be {self}{why}, got {value!r}")
        return value if self.integer else float(value)

    def __str__(self) -> str:
        bound = f"{'>' if self.open_low else '>='} {self.low:g}"
        if self.high != math.inf:
            bound += f" and {'<' if self.open_high else '<='} {self.high:g}"
        return f"{'an integer' if self.integer else 'a number'} {bound}"


COUNT, POSITIVE, NON_NEGATIVE = Range(True, 1), Range(False, 0, open_low=True), Range(False, 0)


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
