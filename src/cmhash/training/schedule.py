"""Learning-rate schedules (params.yaml `train.schedule`), stepped once per epoch, after it.

Every schedule is an optional linear warm-up followed by a main phase, both torch schedulers,
chained with SequentialLR. Epoch e (0-based) trains with the lr reached after e steps.

- Warm-up: over `warmup_epochs` epochs the lr of every param group climbs linearly from the
  same absolute `warmup_lr` to that group's own base lr. LinearLR takes a single start factor
  for all groups, which would scale `warmup_lr` by each group's base lr, so the warm-up is a
  LambdaLR with one exact factor per group: warmup_lr / base_lr at epoch 0, 1 at the end.
- Main phase, run on each group's own base lr, over the `epochs - warmup_epochs` epochs left:
  cosine           CosineAnnealingLR down to `eta_min` as the last epoch ends
  cosine_restarts  CosineAnnealingWarmRestarts (T_0=`restart_period`, T_mult=`restart_mult`)
  step             StepLR: x`gamma` every `step_size` epochs, counted from the end of warm-up
  multistep        MultiStepLR: x`gamma` at each of `milestones` (absolute epoch numbers)
  constant         the base lr throughout
"""

from __future__ import annotations

import math
from typing import Any, Callable

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

from cmhash.config import Range, choose
from cmhash.errors import ConfigError

WHERE = "train.schedule"


class ScheduleConfig:
    """Typed, checked reads of `train.schedule`; every mistake is a one-line ConfigError."""

    KEYS = ("name", "warmup_epochs", "warmup_lr", "eta_min", "restart_period", "restart_mult",
            "step_size", "gamma", "milestones")

    def __init__(self, cfg: Any) -> None:
        if not isinstance(cfg, dict):
            raise ConfigError(f"{WHERE} must be a mapping with keys: {', '.join(self.KEYS)}")
        unknown = sorted(set(cfg) - set(self.KEYS))
        if unknown:
            raise ConfigError(f"{WHERE} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(self.KEYS)}")
        self.cfg = cfg

    def value(self, key: str) -> Any:
        if key not in self.cfg:
            raise ConfigError(f"params.yaml has no `{WHERE}.{key}` (schedule '{self.cfg.get('name')}' needs it); add it")
        return self.cfg[key]

    def integer(self, key: str, minimum: int) -> int:
        return Range(True, minimum).check(f"{WHERE}.{key}", self.value(key))

    def number(self, key: str, low: float, high: float = math.inf, *, open_low: bool = False, why: str = "") -> float:
        """A float in [low, high] (or (low, high] with open_low)."""
        return Range(False, low, open_low, high, open_high=False).check(f"{WHERE}.{key}", self.value(key), why)

    def milestones(self, first: int, last: int) -> list[int]:
        value = self.value("milestones")
        valid = (isinstance(value, list) and value
                 and all(isinstance(m, int) and not isinstance(m, bool) and first < m < last for m in value)
                 and all(a < b for a, b in zip(value, value[1:])))
        if not valid:
            raise ConfigError(f"{WHERE}.milestones must be a non-empty increasing list of epochs, each after the "
                              f"warm-up ({first}) and before the last epoch ({last}), got {value!r}")
        return value


# The main phase: (optimizer, config, warm-up epochs, total epochs) -> scheduler run from the end of warm-up.
MainPhase = Callable[[Optimizer, ScheduleConfig, int, int], LRScheduler]


def _eta_min(optimizer: Optimizer, cfg: ScheduleConfig) -> float:
    return cfg.number("eta_min", 0.0, min(_base_lrs(optimizer)), why=" (the smallest param-group lr)")


def _gamma(cfg: ScheduleConfig) -> float:
    return cfg.number("gamma", 0.0, 1.0, open_low=True)


def _cosine(optimizer: Optimizer, cfg: ScheduleConfig, warmup: int, epochs: int) -> LRScheduler:
    return CosineAnnealingLR(optimizer, T_max=epochs - warmup, eta_min=_eta_min(optimizer, cfg))


def _cosine_restarts(optimizer: Optimizer, cfg: ScheduleConfig, warmup: int, epochs: int) -> LRScheduler:
    return CosineAnnealingWarmRestarts(optimizer, T_0=cfg.integer("restart_period", 1),
                                       T_mult=cfg.integer("restart_mult", 1), eta_min=_eta_min(optimizer, cfg))


def _step(optimizer: Optimizer, cfg: ScheduleConfig, warmup: int, epochs: int) -> LRScheduler:
    return StepLR(optimizer, step_size=cfg.integer("step_size", 1), gamma=_gamma(cfg))


def _multistep(optimizer: Optimizer, cfg: ScheduleConfig, warmup: int, epochs: int) -> LRScheduler:
    # milestones are absolute epochs; the main phase counts its epochs from the end of warm-up
    milestones = [m - warmup for m in cfg.milestones(warmup, epochs)]
    return MultiStepLR(optimizer, milestones=milestones, gamma=_gamma(cfg))


def _constant(optimizer: Optimizer, cfg: ScheduleConfig, warmup: int, epochs: int) -> LRScheduler:
    return ConstantLR(optimizer, factor=1.0, total_iters=0)


SCHEDULES: dict[str, MainPhase] = {
    "cosine": _cosine,
    "cosine_restarts": _cosine_restarts,
    "step": _step,
    "multistep": _multistep,
    "constant": _constant,
}


def _base_lrs(optimizer: Optimizer) -> list[float]:
    # "initial_lr" is where torch's schedulers keep the base lr once one was built on this optimizer
    return [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]


def _linear_warmup(optimizer: Optimizer, cfg: ScheduleConfig, warmup: int) -> LambdaLR:
    bases = _base_lrs(optimizer)
    if min(bases) <= 0:
        raise ConfigError(f"warm-up needs every param group's lr > 0, got {bases}; set the lrs or {WHERE}.warmup_epochs: 0")
    warmup_lr = cfg.number("warmup_lr", 0.0, min(bases), why=" (the smallest param-group lr)")
    starts = [warmup_lr / base for base in bases]
    return LambdaLR(optimizer, [lambda epoch, start=start: start + (1.0 - start) * epoch / warmup for start in starts])


def build_scheduler(optimizer: Optimizer, cfg: dict[str, Any], epochs: int) -> LRScheduler:
    """The schedule `cfg` (params.yaml `train.schedule`) over `epochs` epochs; call `.step()` once
    after each epoch. Raises ConfigError for an unknown name or a bad value."""
    config = ScheduleConfig(cfg)
    name = choose(str(config.value("name")), SCHEDULES, f"{WHERE}.name")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"the number of training epochs must be an integer >= 1, got {epochs!r}")
    warmup = config.integer("warmup_epochs", 0)
    if warmup >= epochs:
        raise ConfigError(f"{WHERE}.warmup_epochs ({warmup}) must be smaller than the training epochs ({epochs})")
    main = SCHEDULES[name](optimizer, config, warmup, epochs)
    if not warmup:
        return main
    return SequentialLR(optimizer, [_linear_warmup(optimizer, config, warmup), main], milestones=[warmup])
