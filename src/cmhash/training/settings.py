"""What one training task reads from params.yaml, as typed sections: built by the training
stages' commands before anything heavy is imported, so a config mistake answers at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmhash.choices.archs import HashHead
from cmhash.choices.schedules import ScheduleBase
from cmhash.config import DistributedConfig, FusionTrain, HashTrain, Params, TrainConfig

TRAIN_COMMON = [name for name in TrainConfig.model_fields if name not in ("fusion", "hash")]


@dataclass(frozen=True)
class TaskSettings:
    """Everything one training task reads from params.yaml, and nothing else."""

    seed: int
    device: str
    loss: str
    loss_knobs: Any  # losses.<loss>
    arch: str
    arch_knobs: Any  # model.<arch>
    train: TrainConfig  # its task section is `task`; the other task's is never read
    task: FusionTrain | HashTrain
    distributed: DistributedConfig
    hash_head: HashHead | None = None  # task 1 only

    @classmethod
    def of(cls, p: Params, task: str) -> TaskSettings:
        return cls(p.seed, p.device, p.loss, p.loss_knobs, p.model.arch, p.model.knobs, p.train,
                   getattr(p.train, task), p.distributed, p.hash_head if task == "hash" else None)

    def reads(self, task: str) -> dict[str, Any]:
        """As params.yaml keys (dvc.yaml lists exactly these for the task's stage)."""
        schedule = self.train.schedule
        keys = {"seed": self.seed, "device": self.device, "loss": self.loss, f"losses.{self.loss}": self.loss_knobs,
                "model.arch": self.arch, f"model.{self.arch}": self.arch_knobs,
                **{f"train.{name}": getattr(self.train, name) for name in TRAIN_COMMON if name != "schedule"},
                **{f"train.schedule.{name}": getattr(schedule, name) for name in ScheduleBase.model_fields},
                f"train.schedule.{schedule.name}": schedule.knobs, f"train.{task}": self.task,
                "distributed": self.distributed}
        if self.hash_head is not None:
            keys["hash_head"] = self.hash_head
        return keys
