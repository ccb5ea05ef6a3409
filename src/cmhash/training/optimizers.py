"""Build the optimiser params.yaml `train.optimizer` names (cmhash.config.choices.optimizers) over named
param groups, each with its own lr."""

from __future__ import annotations

from typing import Any

import torch

from cmhash.config.choices.optimizers import OPTIMIZERS, OptimizerBase


def build_optimizer(cfg: OptimizerBase, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    # every knob is named as the torch optimiser's keyword argument
    return OPTIMIZERS[cfg.name](groups, weight_decay=cfg.weight_decay, **cfg.knobs.model_dump())
