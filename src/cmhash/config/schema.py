"""params.yaml as typed, frozen sections, parsed and checked once, when a command starts.

Every knob's type, allowed values and default live here or, for a registered choice (a loss, a
fusion architecture, an lr schedule, a dataset), with the entry in cmhash.config.choices: the `losses`,
`model`, `train.schedule` and `data` sections get one sub-section per registered name. Nothing
here imports torch, so a mistake is reported at once.
A mistake anywhere in the file is one ConfigError line naming the key (with the closest valid
key for a misspelling), the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from cmhash.config.choices.archs import ARCHS, HashHeadConfig
from cmhash.config.choices.baselines import BASELINES
from cmhash.config.choices.datasets import DATASETS
from cmhash.config.choices.indexes import INDEXES
from cmhash.config.choices.losses import LOSSES
from cmhash.config.choices.optimizers import OPTIMIZERS, OptimizerBase
from cmhash.config.choices.schedules import SCHEDULES, ScheduleBase
from cmhash.config.fields import Count, DeviceName, Flag, NonNegative, NonNegativeInt, Positive, Probability, Section
from cmhash.config.registry import Registry
from cmhash.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def one_of(registry: Registry) -> Any:
    """A str field that must name an entry of `registry`."""
    return Annotated[str, AfterValidator(registry.validate)]


def with_sections(base: type[Section], registry: Registry, name: str) -> type[Section]:
    """`base` plus one field per registered entry, holding that entry's knobs (all defaulted)."""
    fields = {entry.name: (entry.knobs, entry.knobs()) for entry in registry.entries()}
    return create_model(name, __base__=base, **fields)


class DataBase(Section):
    name: one_of(DATASETS) = "demo"
    root: str = "data"  # where real datasets were downloaded (unused by demo)
    on_bad_item: Literal["skip", "fail"] = "skip"  # an unreadable image or empty caption

    @property
    def options(self) -> Any:
        """The chosen dataset's section, `data.<name>`."""
        return getattr(self, self.name)


class ClipConfig(Section):
    model: str = "cmhash-demo"  # an open_clip model name (real use: ViT-B-32)
    pretrained: str = "none"  # an open_clip tag, a local checkpoint file, or none (random init)
    batch_size: Count = 128
    num_workers: NonNegativeInt = 2  # image-decoding worker processes
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    shard_size: Count = 2048  # pairs per resumable shard


class ModelBase(Section):
    arch: one_of(ARCHS) = "reference"

    @property
    def knobs(self) -> Any:
        """The chosen architecture's section, `model.<arch>`."""
        return getattr(self, self.arch)


class FusionTrain(Section):
    """Task 0."""

    epochs: Count = 30
    lr: Positive = 3e-4


class HashTrain(Section):
    """Task 1: hash heads at `lr`, the fusion model they start from fine-tuned at `fusion_lr`."""

    epochs: Count = 30
    lr: Positive = 1e-4
    fusion_lr: Positive = 1e-5
    hash_weight: NonNegative = 0.5  # loss = L(embeddings) + hash_weight * L(hash outputs)
    init: Literal["fusion", "scratch"] = "fusion"  # fusion: start from task 0's model; scratch: a fresh seeded one (the public code)

    @property
    def lrs(self) -> list[float]:
        return [self.fusion_lr, self.lr]


Schedule = with_sections(ScheduleBase, SCHEDULES, "Schedule")
Optimizer = with_sections(OptimizerBase, OPTIMIZERS, "Optimizer")


class AugmentConfig(Section):
    """Feature augmentation of the train batches (never val): both 0 = off."""

    noise_std: NonNegative = 0.0  # gaussian noise of this std added to every feature
    dropout: Probability = 0.0  # each feature zeroed with this probability, the rest scaled by 1 / (1 - p)

    @property
    def on(self) -> bool:
        return bool(self.noise_std or self.dropout)


class TrainConfig(Section):
    inputs: Literal["strict", "paired", "both"] = "both"  # what the loss sees
    batch_size: Count = 128  # pairs per optimiser step
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    clip_grad_norm: NonNegative = 0.0  # max global grad norm; 0 = off
    eval_every: Count = 1  # validate every N epochs (and at the last)
    select_topk: Count = 50  # model selection: val MAP@K (val Recall@K of the paired item on a collection without labels)
    patience: NonNegativeInt = 0  # early stopping after N validations without gain; 0 = off
    min_delta: NonNegative = 0.0
    resume: Flag = True  # continue an unfinished run from its checkpoints
    log_epochs: Flag = True  # one console line per validation (epoch, losses, val MAP@K, lr); false: the progress bar only
    optimizer: Optimizer = Optimizer()
    schedule: Schedule = Schedule()
    augment: AugmentConfig = AugmentConfig()
    fusion: FusionTrain = FusionTrain()
    hash: HashTrain = HashTrain()

    @model_validator(mode="after")
    def _schedule_fits_both_tasks(self) -> TrainConfig:
        for task, section, lrs in (("fusion", self.fusion, [self.fusion.lr]), ("hash", self.hash, self.hash.lrs)):
            try:
                self.schedule.check_against(section.epochs, lrs)
            except ValueError as exc:
                raise ValueError(f"schedule does not fit train.{task}: {exc}") from None
        return self


class DistributedConfig(Section):
    """Several processes (torchrun). Under torchrun its environment decides the world size;
    without it, nproc_per_node > 1 makes extract/train-fusion/train-hash start themselves so."""

    nproc_per_node: Count = 1  # processes on this machine (one per GPU); 1 = no torchrun
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: Count = 1800  # a collective waiting longer than this fails the job instead of hanging


PositiveList = Annotated[list[Count], Field(min_length=1)]


class EvaluateConfig(Section):
    topk: PositiveList = [50]  # MAP@K for each K; MAP@all is always reported
    precision_at: PositiveList = [1, 5, 10, 20, 50, 100, 200, 500, 1000]  # the precision@N curve
    recall_at: PositiveList = [1, 5, 10]  # Recall@K of the paired item (any caption of an image counts), labelled or not


class BaselinesBase(Section):
    """Training-free hashing on the same features (the `baselines` stage): every chosen method at
    every code length in `bits`, list-valued knobs chosen on val."""

    methods: Annotated[list[one_of(BASELINES)], Field(min_length=1)] = ["clip_cosine", "lsh", "pca_itq", "cca_itq"]
    select_topk: Count = 50  # knobs chosen by val MAP@K (val pairs vs train pairs, strict; Recall@K without labels), as training selects

    @field_validator("methods")
    @classmethod
    def _once_each(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError("name each method once")
        return methods

    def knobs(self, method: str) -> Any:
        """`baselines.<method>`."""
        return getattr(self, method)


class SearchBase(Section):
    """`cmhash index` and `cmhash search` (not a dvc.yaml stage): how the codes are indexed."""

    index: one_of(INDEXES) = "flat"  # flat (exact) | ivf | hnsw: `cmhash list indexes`
    rerank: Count = 4  # approximate kinds: k x rerank candidates re-ranked by exact distance

    @property
    def knobs(self) -> Any:
        """The chosen kind's section, `search.<index>`."""
        return getattr(self, self.index)


Losses = with_sections(Section, LOSSES, "Losses")
Baselines = with_sections(BaselinesBase, BASELINES, "Baselines")
Data = with_sections(DataBase, DATASETS, "Data")
Model = with_sections(ModelBase, ARCHS, "Model")
Search = with_sections(SearchBase, INDEXES, "Search")


class Params(Section):
    """The whole of params.yaml."""

    seed: NonNegativeInt = 2023
    device: DeviceName = "auto"
    loss: one_of(LOSSES) = "balanced"
    losses: Losses = Losses()
    bits: PositiveList = [16, 32, 64, 128]  # code lengths trained and evaluated
    data: Data = Data()
    clip: ClipConfig = ClipConfig()
    model: Model = Model()
    hash_head: HashHeadConfig = HashHeadConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    baselines: Baselines = Baselines()
    search: Search = Search()

    @property
    def loss_knobs(self) -> Any:
        """The chosen loss's section, `losses.<loss>`."""
        return getattr(self.losses, self.loss)


# ------------------------------------------------------------------ loading and messages


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """params.yaml, checked whole."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of parameters")
    return parse_params(raw, where=str(path))


def parse_params(raw: dict[str, Any], where: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """The first problem pydantic found, as one line; a count of the others."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = first["loc"]
    key = dotted(loc)
    if first["type"] == "extra_forbidden":
        line = f"unknown key {key}{_suggestion(loc)}"
    elif first["type"] == "missing":
        line = f"missing key {key}"
    else:
        message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
        message = message[:1].lower() + message[1:]
        value = first.get("input")
        line = f"{key}: {message}" if isinstance(value, dict) or not loc else f"{key} = {value!r}: {message}"
    more = len(errors) - 1
    return line + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def dotted(loc: tuple[Any, ...]) -> str:
    """('bits', 0) -> 'bits[0]', ('train', 'fusion', 'lr') -> 'train.fusion.lr'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or "(top level)"


# Keys that moved into per-architecture, per-head and per-schedule sections: old params files
# get pointed at the new place.
MOVED = {
    **{f"model.{k}": f"model.<arch>.{k}" for k in ("d_model", "nhead", "num_layers", "dim_feedforward", "dropout", "attention_dropout")},
    "model.hash_hidden": "hash_head.hidden", "model.hash_dropout": "hash_head.dropout",
    **{f"train.schedule.{k}": f"train.schedule.<name>.{k}" for k in ("eta_min", "step_size", "gamma", "milestones")},
    "train.schedule.restart_period": "train.schedule.cosine_restarts.first_period",
    "train.schedule.restart_mult": "train.schedule.cosine_restarts.period_mult",
}


def _suggestion(loc: tuple[Any, ...]) -> str:
    if dotted(loc) in MOVED:
        return f"; it is now {MOVED[dotted(loc)]}"
    valid = list(section_at(loc[:-1]).model_fields)
    if not valid:
        return f"; {dotted(loc[:-1])} takes no keys"
    typed = str(loc[-1])
    close = difflib.get_close_matches(typed, valid, n=3, cutoff=0.5)
    close.sort(key=lambda name: sorted(name) != sorted(typed))  # two letters swapped: that key first (cac_itq: cca_itq)
    prefix = dotted(loc[:-1]) + "." if loc[:-1] else ""
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f"; valid keys here: {', '.join(valid)}"


def section_at(loc: tuple[Any, ...], model: type[BaseModel] = Params) -> type[BaseModel]:
    """The Section class at a key path of the schema."""
    for part in loc:
        model = section_type(model.model_fields[part].annotation)
    return model


def section_type(annotation: Any) -> Any:
    """The Section class inside an annotation (Optional[X] -> X), or the annotation itself."""
    if get_origin(annotation) is not None and not isinstance(annotation, type):
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return annotation


def leaf_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key of the schema that holds a value (not a section)."""
    keys = []
    for name, field in model.model_fields.items():
        inner = section_type(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            keys += leaf_keys(inner, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys

