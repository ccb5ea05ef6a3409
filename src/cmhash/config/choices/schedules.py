"""Learning-rate schedules (params.yaml `train.schedule`): a warm-up every schedule shares, then
the main phase `name` with its knobs in `train.schedule.<name>`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator

from cmhash.config.fields import Count, NonNegative, NonNegativeInt, Positive, Section
from cmhash.config.registry import Registry

SCHEDULES = Registry("schedule")
Decay = Annotated[Positive, Field(le=1)]  # an lr multiplier at a drop

SCHEDULES.add("constant", "cmhash.training.schedule:constant", summary="The base lr throughout.")


@SCHEDULES.register("cosine", "cmhash.training.schedule:cosine")
class Cosine(Section):
    """Cosine annealing to eta_min as the last epoch ends."""

    eta_min: NonNegative = 1e-6  # lowest lr


@SCHEDULES.register("cosine_restarts", "cmhash.training.schedule:cosine_restarts")
class CosineRestarts(Cosine):
    """Cosine annealing with warm restarts (SGDR)."""

    first_period: Count = 10  # epochs of the first cycle
    period_mult: Count = 1  # each cycle is this many times longer than the one before


@SCHEDULES.register("step", "cmhash.training.schedule:step")
class StepDecay(Section):
    """x gamma every step_size epochs, counted from the end of warm-up."""

    step_size: Count = 10
    gamma: Decay = 0.1


@SCHEDULES.register("multistep", "cmhash.training.schedule:multistep")
class MultiStep(Section):
    """x gamma at each milestone (absolute epoch numbers, or batches when stepped per batch)."""

    milestones: list[Count] = [20, 25]
    gamma: Positive = 0.1  # above 1 raises the lr, as the public UCMFH code does for its hash heads

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if not value or any(a >= b for a, b in zip(value, value[1:])):
            raise ValueError("must be a non-empty increasing list of epochs")
        return value


class ScheduleBase(Section):
    """The knobs every schedule shares; `cmhash.config.schema` adds one section per registered schedule."""

    name: Annotated[str, AfterValidator(SCHEDULES.validate)] = "constant"
    warmup_epochs: NonNegativeInt = 0  # linear warm-up from warmup_lr to each param group's lr
    warmup_lr: NonNegative = 1e-6
    every: Literal["epoch", "batch"] = "epoch"  # step after each epoch, or after each batch (counts then in batches)
    groups: Literal["all", "hash"] = "all"  # schedule every param group, or the hash heads' alone (the fusion lr stays)

    @property
    def per_batch(self) -> bool:
        return self.every == "batch"

    @property
    def knobs(self) -> Any:
        """The chosen schedule's own section, `train.schedule.<name>`."""
        return getattr(self, self.name)

    def check_against(self, epochs: int, lrs: list[float]) -> None:
        """Fit this schedule to a task that trains `epochs` epochs with param-group lrs `lrs`;
        ValueError (one line) otherwise."""
        if self.warmup_epochs >= epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than the training epochs ({epochs})")
        lowest = min(lrs)
        if self.warmup_epochs and self.warmup_lr > lowest:
            raise ValueError(f"warmup_lr ({self.warmup_lr:g}) must be at most the smallest param-group lr ({lowest:g})")
        eta_min = getattr(self.knobs, "eta_min", None)
        if eta_min is not None and eta_min > lowest:
            raise ValueError(f"{self.name}.eta_min ({eta_min:g}) must be at most the smallest param-group lr ({lowest:g})")
        milestones = getattr(self.knobs, "milestones", None)
        # per batch, milestones count batches: the batches per epoch are known once the data is (build_schedule)
        if milestones and not self.per_batch and not self.warmup_epochs < milestones[0] <= milestones[-1] < epochs:
            raise ValueError(f"{self.name}.milestones {milestones} must lie after the warm-up ({self.warmup_epochs}) "
                             f"and before the last epoch ({epochs})")
