"""Where a stage runs: params.yaml `device` (auto, cpu, cuda or cuda:N) as a torch device. Under
torchrun each rank takes the GPU of its local rank."""

from __future__ import annotations

import torch

from cmhash.config.fields import DEVICE_NAME
from cmhash.errors import ConfigError
from cmhash.runtime.distributed import current_world


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`; ConfigError otherwise.
    With several processes, `auto`/`cuda` mean cuda:LOCAL_RANK."""
    world = current_world()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if world.distributed and name != "cuda":
        raise ConfigError(f"device '{name}' names one GPU for all {world.size} processes; use device: cuda or auto "
                          "(each rank then takes cuda:LOCAL_RANK)")
    if world.distributed:
        name = f"cuda:{world.local_rank}"
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device: auto or cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                          "use device: cuda or a smaller index")
    return device
