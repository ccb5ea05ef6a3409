"""The training loop. Everything around it (validation, checkpoints, early stopping, logging)
attaches as hooks: callables run after each epoch that read and update the TrainState."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cmhash.features import Features
from cmhash.progress import progress_bar
from cmhash.training.monitor import Meter, pair_stats
from cmhash.training.runner import Runner


@dataclass
class TrainState:
    runner: Runner
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Any  # cmhash.training.precision.Precision
    epoch: int = 0  # epochs completed
    logs: dict[str, float] = field(default_factory=dict)  # this epoch's numbers, filled by the loop and hooks
    best: float = -math.inf
    best_epoch: int = 0
    stop: bool = False


Hook = Callable[[TrainState], None]


def full_batch_starts(n: int, batch_size: int) -> range:
    """Where each batch of n items starts, the last short batch left out when there is more than
    one batch: batch-size-dependent losses (the contrastive ones) then always see the same size."""
    return range(0, n - n % batch_size if n > batch_size else n, batch_size)


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[Tensor]:
    """Shuffled index batches drawn on the device: the features stay where they are. The short
    batch left out is a different one each epoch."""
    order = torch.randperm(n, generator=generator).to(device)
    for start in full_batch_starts(n, batch_size):
        yield order[start : start + batch_size]


def fit(state: TrainState, train: Features, *, epochs: int, batch_size: int, clip_grad_norm: float,
        hooks: list[Hook], generator: torch.Generator) -> TrainState:
    model = state.runner.model
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    with progress_bar("train", total=epochs, unit="epoch") as advance:
        advance(state.epoch)  # resumed runs start part-way
        while state.epoch < epochs and not state.stop:
            model.train()
            meter = Meter()
            lrs = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(state.optimizer.param_groups)}
            for idx in batches(len(train), batch_size, generator, train.image.device):
                with state.precision.autocast():
                    loss, outputs = state.runner.step(train.image[idx], train.text[idx])
                grad_norm = state.precision.backward_step(loss, state.optimizer, params, clip_grad_norm).item()
                stats = {"loss": loss.item(), **pair_stats(*outputs)}
                if math.isfinite(grad_norm):  # not on fp16 steps the scaler skipped
                    stats["grad_norm"] = grad_norm  # before clipping
                meter.add(len(idx), stats)
            state.scheduler.step()
            state.epoch += 1
            state.logs = {**meter.means("train"), **lrs}
            for hook in hooks:
                hook(state)
            advance(1, description=f"train (loss {state.logs['train/loss']:.4f})")
    return state
