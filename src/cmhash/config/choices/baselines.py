"""Training-free baselines (params.yaml `baselines.methods`), each with its knobs in
`baselines.<name>`. A knob given as a list is a set of candidates: the stage fits every
combination on train and keeps the one with the best val MAP, never looking at the query set."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from cmhash.config.fields import Count, NonNegative, Positive, Section
from cmhash.config.registry import Registry

BASELINES = Registry("baseline")

BASELINES.add("clip_cosine", "cmhash.baselines.methods:ClipCosine",
              summary="The float CLIP features ranked by cosine: the unhashed reference.")
BASELINES.add("lsh", "cmhash.baselines.methods:Lsh",
              summary="Sign of one shared Gaussian projection, each modality centred by its train mean.")


@BASELINES.register("pca_itq", "cmhash.baselines.methods:PcaItq")
class PcaItq(Section):
    """PCA of both modalities' centred train features, stacked, then ITQ (Gong & Lazebnik)."""

    n_iter: Count = 50  # ITQ iterations


@BASELINES.register("cca_itq", "cmhash.baselines.methods:CcaItq")
class CcaItq(Section):
    """CCA of the train pairs, its top directions, then one ITQ rotation for both modalities."""

    ridge: Annotated[list[Positive], Field(min_length=1)] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]  # x trace(C)/d on each covariance
    scale_power: Annotated[list[NonNegative], Field(min_length=1)] = [0.0, 1.0]  # direction j weighted by correlation_j ** p
    n_iter: Count = 50  # ITQ iterations
