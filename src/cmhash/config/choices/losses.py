"""Training losses (params.yaml `loss`), each with its knobs in `losses.<name>`."""

from __future__ import annotations

from pydantic import model_validator

from cmhash.config.fields import NonNegative, Positive, Section
from cmhash.config.registry import Registry

LOSSES = Registry("loss")


@LOSSES.register("contrastive", "cmhash.losses:ContrastiveLoss")
class Contrastive(Section):
    """SimCLR NT-Xent over the 2B stacked embeddings (the reference's loss)."""

    temperature: Positive = 0.5


@LOSSES.register("balanced", "cmhash.losses:BalancedContrastiveLoss")
class Balanced(Section):
    """Cross-modal InfoNCE, positives and negatives weighted to balance."""

    temperature: Positive = 0.5


@LOSSES.register("infonce", "cmhash.losses:InfoNCELoss")
class InfoNCE(Section):
    """CLIP-style symmetric cross-entropy over the B x B cross-modal logits."""

    temperature: Positive = 0.07


LOSSES.add("mse", "cmhash.losses:MSELoss", summary="Mean squared error between paired embeddings.")
LOSSES.add("cosine", "cmhash.losses:CosineLoss", summary="Mean over pairs of 1 - cos(x_i, y_i).")


@LOSSES.register("cosine_mse", "cmhash.losses:CosineMSELoss")
class CosineMSE(Section):
    """cosine_weight * (1 - cos) + mse_weight * MSE."""

    cosine_weight: NonNegative = 0.7
    mse_weight: NonNegative = 0.3

    @model_validator(mode="after")
    def _trains_something(self) -> CosineMSE:
        if self.cosine_weight == self.mse_weight == 0:
            raise ValueError("cosine_weight and mse_weight are both 0, so nothing would be trained; make one of them positive")
        return self
