"""Where a stage runs: params.yaml `device` (auto, cpu, cuda or cuda:N) as a torch device."""

from __future__ import annotations

import torch

from cmhash.errors import ConfigError
from cmhash.sections import DEVICE_NAME


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`; ConfigError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device: auto or cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                          "use device: cuda or a smaller index")
    return device
