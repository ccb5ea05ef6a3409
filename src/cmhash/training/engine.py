"""The training loop. Everything around it (validation, checkpoints, early stopping, logging)
attaches as hooks: callables run after each epoch that read and update the TrainState.

Under several processes (W ranks) `train.batch_size` is the global batch B: every rank draws the
same seeded permutation each epoch and takes its own contiguous B/W rows of each batch (rank r:
rows r*B/W to (r+1)*B/W - 1), so the ranks' rows in rank order are exactly the one-process batch.
The logged train numbers describe the global batch: the monitor stats are computed on the
gathered outputs and the epoch's sums are added over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cmhash.features.store import FeatureSplit
from cmhash.runtime.distributed import ONE_PROCESS, World, gather_rows
from cmhash.runtime.progress import progress_bar
from cmhash.training.monitor import Meter, pair_stats
from cmhash.training.runner import Runner


@dataclass
class TrainState:
    runner: Runner
    optimizer: torch.optim.Optimizer
    scheduler: Any  # cmhash.training.schedule.ScheduleStepper
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


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device, world: World = ONE_PROCESS) -> Iterator[Tensor]:
    """Shuffled index batches drawn on the device: the features stay where they are. The short
    batch left out is a different one each epoch. Under several processes, this rank's equal,
    contiguous share of each batch (the generator is seeded alike on every rank)."""
    order = torch.randperm(n, generator=generator).to(device)
    for start in full_batch_starts(n, batch_size):
        batch = order[start : start + batch_size]
        share = len(batch) // world.size  # the task checked that it divides
        yield batch[world.rank * share : (world.rank + 1) * share]


def fit(state: TrainState, train: FeatureSplit, *, epochs: int, batch_size: int, clip_grad_norm: float,
        hooks: list[Hook], generator: torch.Generator,
        augment: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None) -> TrainState:
    """`augment`: applied to each train batch (image, text) before the step (cmhash.training.augment)."""
    network, world = state.runner.network, state.runner.world
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    with progress_bar("train", total=epochs, unit="epoch") as advance:
        advance(state.epoch)  # resumed runs start part-way
        while state.epoch < epochs and not state.stop:
            network.train()
            meter = Meter()
            lrs = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(state.optimizer.param_groups)}
            for idx in batches(len(train), batch_size, generator, train.image.device, world):
                image, text = train.image[idx], train.text[idx]
                if augment is not None:
                    image, text = augment(image, text)
                with state.precision.autocast():
                    loss, outputs = state.runner.step(image, text)
                grad_norm = state.precision.backward_step(loss, state.optimizer, params, clip_grad_norm).item()
                state.scheduler.after_batch()
                stats = {"loss": loss.item(), **pair_stats(*map(gather_rows, outputs))}  # of the global batch
                if math.isfinite(grad_norm):  # not on fp16 steps the scaler skipped
                    stats["grad_norm"] = grad_norm  # before clipping
                meter.add(len(idx), stats)
            state.scheduler.after_epoch()
            state.epoch += 1
            state.logs = {**meter.summed_over_ranks().means("train"), **lrs}
            for hook in hooks:
                hook(state)
            advance(1, description=f"train (loss {state.logs['train/loss']:.4f})")
    return state
