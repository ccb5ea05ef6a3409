"""The building blocks of the typed configuration: a frozen `Section` base (one per params.yaml
mapping) and the value types its fields use. Registered entries (losses, architectures, lr
schedules, datasets) declare their knobs with these; `cmhash.config.schema` assembles the whole schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, model_validator


class Section(BaseModel):
    """A params.yaml mapping: frozen, every value checked, an unknown key refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _empty(cls, data: Any) -> Any:
        # `mse:` and `mse: {}` both mean "no knobs" (YAML reads the first as null).
        return {} if data is None else data


def _not_bool(value: Any) -> Any:
    # pydantic would read true as 1.0; a YAML boolean where a number belongs is a mistake.
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


# Floats also accept PyYAML's string numbers ("1e-4": YAML 1.1 floats need a dot), never inf/nan.
Number = Annotated[float, BeforeValidator(_not_bool)]
Positive = Annotated[Number, Field(gt=0)]
NonNegative = Annotated[Number, Field(ge=0)]
Probability = Annotated[Number, Field(ge=0, lt=1)]  # a dropout rate, a beta
Fraction = Annotated[Number, Field(ge=0, le=1)]
Count = Annotated[StrictInt, Field(ge=1)]  # integers are integers: 2.0 and "2" are refused
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Flag = StrictBool

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(name: str) -> str:
    if not DEVICE_NAME.fullmatch(name):
        raise ValueError("use auto, cpu, cuda or cuda:N")
    return name


DeviceName = Annotated[str, AfterValidator(_device)]  # auto: CUDA when present, else CPU
