"""Optimisers (params.yaml `train.optimizer`): torch optimisers sharing `weight_decay`, each with
its own knobs in `train.optimizer.<name>`, named as torch's keyword arguments are."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, model_validator

from cmhash.config.fields import Flag, NonNegative, Probability, Section
from cmhash.config.registry import Registry

OPTIMIZERS = Registry("optimizer")


@OPTIMIZERS.register("adam", "torch.optim:Adam")
class Adam(Section):
    """Adam."""

    betas: tuple[Probability, Probability] = (0.5, 0.999)  # the public UCMFH code's


@OPTIMIZERS.register("adamw", "torch.optim:AdamW")
class AdamW(Adam):
    """Adam with decoupled weight decay."""


@OPTIMIZERS.register("sgd", "torch.optim:SGD")
class Sgd(Section):
    """SGD with (Nesterov) momentum."""

    momentum: Probability = 0.9
    nesterov: Flag = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> Sgd:
        if self.nesterov and not self.momentum:
            raise ValueError("nesterov needs momentum > 0")
        return self


@OPTIMIZERS.register("rmsprop", "torch.optim:RMSprop")
class RmsProp(Section):
    """RMSProp."""

    alpha: Probability = 0.99  # smoothing of the squared-gradient average
    momentum: Probability = 0.0


class OptimizerBase(Section):
    """The knobs every optimiser shares; `cmhash.config.schema` adds one section per registered optimiser."""

    name: Annotated[str, AfterValidator(OPTIMIZERS.validate)] = "adam"
    weight_decay: NonNegative = 0.0

    @property
    def knobs(self) -> Any:
        """The chosen optimiser's own section, `train.optimizer.<name>`."""
        return getattr(self, self.name)
