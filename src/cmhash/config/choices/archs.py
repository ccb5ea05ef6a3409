"""Fusion architectures (params.yaml `model.arch`), each with its knobs in `model.<arch>`; and the
hash heads' knobs (`hash_head`), read by task 1 only."""

from __future__ import annotations

from typing import Literal

from cmhash.config.fields import Count, Probability, Section
from cmhash.config.registry import Registry

ARCHS = Registry("fusion architecture")


@ARCHS.register("reference", "cmhash.models:ReferenceFusion")
class Transformer(Section):
    """concat(image, text) as one token -> TransformerEncoder (the public code)."""

    d_model: Count | None = None  # None: 2 x the CLIP feature dim (reference: 1024 for ViT-B-32)
    nhead: Count = 4
    num_layers: Count = 2
    dim_feedforward: Count = 2048
    dropout: Probability = 0.1  # transformer layers (attention, feed-forward, residuals)


@ARCHS.register("cross_attention", "cmhash.models:CrossAttentionFusion")
class CrossAttention(Transformer):
    """Per-modality transformers, then cross-attention within each pair."""

    attention_dropout: Probability = 0.1  # on the cross-attention weights


class HashHeadConfig(Section):
    """The image and text hash heads (task 1)."""

    hidden: Count = 4096
    dropout: Probability = 0.3
    # random: an MLP on the fusion embedding. cca_itq: plus a linear path from the modality's own
    # features, started at the baselines stage's CCA-ITQ projection (the MLP's output at zero), so
    # training starts from CCA-ITQ's codes and fine-tunes them.
    init: Literal["random", "cca_itq"] = "cca_itq"
