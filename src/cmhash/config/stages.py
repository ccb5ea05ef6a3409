"""What each stage reads from params.yaml, as one frozen settings object per stage: built by the
stage's command before anything heavy is imported (a config mistake answers at once), handed to
its `run`, and the one list of the keys the stage depends on (`reads()`; dvc.yaml lists exactly
these, a test holds the two together)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmhash.config.choices.archs import HashHeadConfig
from cmhash.config.choices.optimizers import OptimizerBase
from cmhash.config.choices.schedules import ScheduleBase
from cmhash.config.schema import Baselines, ClipConfig, Data, DistributedConfig, EvaluateConfig, FusionTrain, HashTrain, Params, TrainConfig

TRAIN_COMMON = [name for name in TrainConfig.model_fields if name not in ("fusion", "hash")]
CHOSEN = {"schedule": ScheduleBase, "optimizer": OptimizerBase}  # train sections holding one section per registered choice


@dataclass(frozen=True)
class PrepareSettings:
    seed: int
    data: Data

    @classmethod
    def of(cls, p: Params) -> PrepareSettings:
        return cls(seed=p.seed, data=p.data)

    def reads(self) -> dict[str, Any]:
        d = self.data
        return {"seed": self.seed, "data.name": d.name, "data.root": d.root, "data.on_bad_item": d.on_bad_item,
                f"data.{d.name}": d.options}


@dataclass(frozen=True)
class ExtractSettings:
    """`distributed` is not here: it chooses how many processes encode, and the features are
    byte-identical whatever that number (the launcher reads it before the stage runs)."""

    seed: int
    device: str
    on_bad_item: str
    clip: ClipConfig

    @classmethod
    def of(cls, p: Params) -> ExtractSettings:
        return cls(seed=p.seed, device=p.device, on_bad_item=p.data.on_bad_item, clip=p.clip)

    def reads(self) -> dict[str, Any]:
        return {"seed": self.seed, "device": self.device, "data.on_bad_item": self.on_bad_item, "clip": self.clip}


@dataclass(frozen=True)
class EvaluateSettings:
    device: str
    bits: list[int]
    evaluate: EvaluateConfig

    @classmethod
    def of(cls, p: Params) -> EvaluateSettings:
        return cls(device=p.device, bits=list(p.bits), evaluate=p.evaluate)

    def reads(self) -> dict[str, Any]:
        return {"device": self.device, "bits": self.bits, "evaluate": self.evaluate}


@dataclass(frozen=True)
class BaselinesSettings:
    seed: int
    bits: list[int]
    baselines: Baselines

    @classmethod
    def of(cls, p: Params) -> BaselinesSettings:
        return cls(seed=p.seed, bits=list(p.bits), baselines=p.baselines)

    def reads(self) -> dict[str, Any]:
        return {"seed": self.seed, "bits": self.bits, "baselines": self.baselines}


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
    hash_head: HashHeadConfig | None = None  # task 1 only

    @classmethod
    def of(cls, p: Params, task: str) -> TaskSettings:
        return cls(seed=p.seed, device=p.device, loss=p.loss, loss_knobs=p.loss_knobs, arch=p.model.arch, arch_knobs=p.model.knobs,
                   train=p.train, task=getattr(p.train, task), distributed=p.distributed,
                   hash_head=p.hash_head if task == "hash" else None)

    def reads(self, task: str) -> dict[str, Any]:
        """As params.yaml keys (dvc.yaml lists exactly these for the task's stage)."""
        keys = {"seed": self.seed, "device": self.device, "loss": self.loss, f"losses.{self.loss}": self.loss_knobs,
                "model.arch": self.arch, f"model.{self.arch}": self.arch_knobs,
                **{f"train.{name}": getattr(self.train, name) for name in TRAIN_COMMON if name not in CHOSEN},
                f"train.{task}": self.task, "distributed": self.distributed}
        for name, base in CHOSEN.items():  # the shared knobs, and the chosen entry's section alone
            section = getattr(self.train, name)
            keys.update({f"train.{name}.{key}": getattr(section, key) for key in base.model_fields})
            keys[f"train.{name}.{section.name}"] = section.knobs
        if self.hash_head is not None:
            keys["hash_head"] = self.hash_head
        return keys


@dataclass(frozen=True)
class ReportSettings:
    """The run's key settings, shown on the report page (the numbers come from metrics/)."""

    seed: int
    data_name: str
    loss: str
    arch: str
    bits: list[int]
    hash_init: str
    batch_size: int
    select_topk: int
    fusion: FusionTrain
    hash: HashTrain

    @classmethod
    def of(cls, p: Params) -> ReportSettings:
        return cls(seed=p.seed, data_name=p.data.name, loss=p.loss, arch=p.model.arch, bits=list(p.bits), hash_init=p.hash_head.init,
                   batch_size=p.train.batch_size, select_topk=p.train.select_topk, fusion=p.train.fusion, hash=p.train.hash)

    def reads(self) -> dict[str, Any]:
        return {"seed": self.seed, "data.name": self.data_name, "loss": self.loss, "model.arch": self.arch, "bits": self.bits,
                "hash_head.init": self.hash_init, "train.batch_size": self.batch_size, "train.select_topk": self.select_topk,
                "train.fusion": self.fusion, "train.hash": self.hash}
