"""One way to build what a training task trains: the seeded model, its loss, the optimiser over
its parameter groups, the lr schedule and the precision. The stage, the training benchmark and
the GPU check all call `build_state`, so what they time is what the stage runs."""

from __future__ import annotations

from typing import Any

import torch

from cmhash.config.stages import TaskSettings
from cmhash.losses import build_loss
from cmhash.models import CrossModalHasher, ModelConfig
from cmhash.runtime.distributed import ONE_PROCESS, World
from cmhash.runtime.precision import Precision
from cmhash.training.engine import TrainState
from cmhash.training.optimizers import build_optimizer
from cmhash.training.runner import Runner
from cmhash.training.schedule import ScheduleStepper


def model_config(settings: TaskSettings, feature_dim: int, bits: int | None, clip: dict[str, Any] | None = None) -> ModelConfig:
    return ModelConfig(arch=settings.arch, knobs=settings.arch_knobs.model_dump(), feature_dim=feature_dim, bits=bits,
                       hash_head=settings.hash_head if bits else None, loss=settings.loss, clip=clip or {})


def build_state(settings: TaskSettings, config: ModelConfig, device: torch.device, *, precision: str | None = None,
                world: World = ONE_PROCESS, init: CrossModalHasher | None = None, batches_per_epoch: int = 1) -> TrainState:
    """The model draws its initial weights from torch's generator as it stands (seed it first);
    `init`: a fusion model whose weights task 1 starts from. `precision`: train.precision unless given.
    `batches_per_epoch`: what a schedule stepped per batch counts to."""
    model = CrossModalHasher(config).to(device)
    if init is not None:
        model.fusion.load_state_dict(init.fusion.state_dict())
    stage, bits = settings.task, config.bits
    groups = [{"name": "fusion", "params": model.fusion.parameters(), "lr": stage.fusion_lr if bits else stage.lr}]
    if bits:
        groups.append({"name": "hash", "params": [*model.image_head.parameters(), *model.text_head.parameters()], "lr": stage.lr})
    optimizer = build_optimizer(settings.train.optimizer, groups)
    return TrainState(
        runner=Runner(model, build_loss(settings.loss, settings.loss_knobs), settings.train.inputs,
                      stage.hash_weight if bits else None, world),
        optimizer=optimizer,
        scheduler=ScheduleStepper(optimizer, settings.train.schedule, stage.epochs, batches_per_epoch),
        precision=Precision(precision or settings.train.precision, device),
    )
