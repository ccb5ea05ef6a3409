"""Build the optimiser params.yaml `train.optimizer` names (cmhash.config.choices.optimizers) over named
param groups, each with its own lr."""

from __future__ import annotations

from typing import Any

import torch

from cmhash.config.choices.optimizers import OPTIMIZERS, OptimizerConfig


def build_optimizer(cfg: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
