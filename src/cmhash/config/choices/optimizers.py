"""Optimisers (params.yaml `train.optimizer`): torch optimisers that share the knobs below."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from cmhash.config.fields import NonNegative, Probability, Section
from cmhash.config.registry import Registry

OPTIMIZERS = Registry("optimizer")
OPTIMIZERS.add("adam", "torch.optim:Adam", summary="Adam.")
OPTIMIZERS.add("adamw", "torch.optim:AdamW", summary="Adam with decoupled weight decay.")


class OptimizerConfig(Section):
    name: Annotated[str, AfterValidator(OPTIMIZERS.validate)] = "adam"
    betas: tuple[Probability, Probability] = (0.5, 0.999)
    weight_decay: NonNegative = 0.0
