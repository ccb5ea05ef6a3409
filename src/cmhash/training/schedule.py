"""Learning-rate schedules (params.yaml `train.schedule`), stepped once per epoch, after it
(`every: epoch`, the default), or after every batch (`every: batch`, as the public UCMFH code
steps its hash heads' schedulers), over every param group (`groups: all`) or the hash heads'
alone (`groups: hash`: the fusion model keeps its base lr, as in the public code).

Every schedule is an optional linear warm-up followed by a main phase, both torch schedulers,
chained with SequentialLR. Epoch e (0-based) trains with the lr reached after e steps; per
batch, batch b of the run (0-based, counted over epochs) trains with the lr reached after b
steps, and the schedule's own counts (`step_size`, `first_period`, `milestones`) are batches,
the warm-up still `warmup_epochs` epochs (that many epochs' batches) and cosine spans the run.

- Warm-up (`warmup_epochs`, `warmup_lr`, shared by every schedule): over `warmup_epochs` epochs
  the lr of every param group climbs linearly from the same absolute `warmup_lr` to that group's
  own base lr. LinearLR takes a single start factor for all groups, which would scale
  `warmup_lr` by each group's base lr, so the warm-up is a LambdaLR with one exact factor per
  group: warmup_lr / base_lr at epoch 0, 1 at the end.
- Main phase (`name`, with its knobs in `train.schedule.<name>`), run on each group's own base
  lr over the `epochs - warmup_epochs` epochs left:
  cosine           CosineAnnealingLR down to `eta_min` as the last epoch ends
  cosine_restarts  CosineAnnealingWarmRestarts (T_0=`first_period`, T_mult=`period_mult`)
  step             StepLR: x`gamma` every `step_size` epochs, counted from the end of warm-up
  multistep        MultiStepLR: x`gamma` at each of `milestones` (absolute epoch numbers)
  constant         the base lr throughout

The checks that tie a schedule to the training epochs and learning rates (warm-up shorter than
training, milestones inside it, lowest lrs below every group's lr) are part of the config:
`ScheduleBase.check_against`, run when params.yaml is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    LambdaLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
    StepLR,
)

from cmhash.config.choices.schedules import SCHEDULES, Cosine, CosineRestarts, MultiStep, ScheduleBase, StepDecay
from cmhash.config.fields import Section
from cmhash.errors import ConfigError

# A main phase: (optimizer, its knobs, warm-up epochs, total epochs) -> scheduler run from the end
# of warm-up. Each is registered by name, with its knobs, in cmhash.config.choices.schedules.
MainPhase = Callable[[Optimizer, Any, int, int], LRScheduler]


def cosine(optimizer: Optimizer, knobs: Cosine, warmup: int, epochs: int) -> LRScheduler:  # counts: epochs or batches
    return CosineAnnealingLR(optimizer, T_max=epochs - warmup, eta_min=knobs.eta_min)


def cosine_restarts(optimizer: Optimizer, knobs: CosineRestarts, warmup: int, epochs: int) -> LRScheduler:
    return CosineAnnealingWarmRestarts(optimizer, T_0=knobs.first_period, T_mult=knobs.period_mult, eta_min=knobs.eta_min)


def step(optimizer: Optimizer, knobs: StepDecay, warmup: int, epochs: int) -> LRScheduler:
    return StepLR(optimizer, step_size=knobs.step_size, gamma=knobs.gamma)


def multistep(optimizer: Optimizer, knobs: MultiStep, warmup: int, epochs: int) -> LRScheduler:
    # milestones are absolute epochs; the main phase counts its epochs from the end of warm-up
    return MultiStepLR(optimizer, milestones=[m - warmup for m in knobs.milestones], gamma=knobs.gamma)


def constant(optimizer: Optimizer, knobs: Section, warmup: int, epochs: int) -> LRScheduler:
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


def _base_lrs(optimizer: Optimizer) -> list[float]:
    # "initial_lr" is where torch's schedulers keep the base lr once one was built on this optimizer
    return [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]


def _linear_warmup(optimizer: Optimizer, warmup_lr: float, warmup: int) -> LambdaLR:
    starts = [warmup_lr / base for base in _base_lrs(optimizer)]
    return LambdaLR(optimizer, [lambda epoch, start=start: start + (1.0 - start) * epoch / warmup for start in starts])


def build_scheduler(optimizer: Optimizer, cfg: ScheduleBase, epochs: int, per_epoch: int = 1) -> LRScheduler:
    """The torch scheduler of `cfg` (params.yaml `train.schedule`, checked against the task's
    epochs and lrs when it was loaded) over `epochs` epochs of `per_epoch` steps each; call
    `.step()` after each step (an epoch, or a batch with `per_epoch` batches an epoch)."""
    steps, warmup = epochs * per_epoch, cfg.warmup_epochs * per_epoch
    milestones = getattr(cfg.knobs, "milestones", None)
    if milestones and milestones[0] <= warmup:
        raise ConfigError(f"train.schedule.{cfg.name}.milestones {milestones} must lie after the warm-up ({warmup} batches)")
    main: MainPhase = SCHEDULES[cfg.name]
    main = main(optimizer, cfg.knobs, warmup, steps)
    if not warmup:
        return main
    return SequentialLR(optimizer, [_linear_warmup(optimizer, cfg.warmup_lr, warmup), main], milestones=[warmup])


class ScheduleStepper:
    """The lr schedule as the training loop drives it: the torch scheduler stepped after every
    epoch or every batch (`train.schedule.every`), on every param group, or on the hash heads'
    group alone (`groups: hash`; the others are held at their base lr, in task 0 all of them)."""

    def __init__(self, optimizer: Optimizer, cfg: ScheduleBase, epochs: int, per_epoch: int) -> None:
        held = [i for i, group in enumerate(optimizer.param_groups) if cfg.groups == "hash" and group.get("name") != "hash"]
        bases = _base_lrs(optimizer)
        self.held = {i: bases[i] for i in held}
        self.optimizer, self.per_batch = optimizer, cfg.per_batch
        self.scheduler = build_scheduler(optimizer, cfg, epochs, per_epoch if cfg.per_batch else 1)
        self._hold()  # a warm-up has already set every group's starting lr

    def _hold(self) -> None:
        for i, lr in self.held.items():
            self.optimizer.param_groups[i]["lr"] = lr

    def step(self) -> None:
        self.scheduler.step()
        self._hold()

    def after_batch(self) -> None:
        if self.per_batch:
            self.step()

    def after_epoch(self) -> None:
        if not self.per_batch:
            self.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(saved)
