"""Pair losses between image-side embeddings x [B, D] and text-side embeddings y [B, D].

Row i of x is paired with row i of y; every other row of the batch is a negative for the
contrastive losses. All losses here are symmetric: swapping x and y leaves the value unchanged.
Each is registered by name, with its knobs (`losses.<name>` in params.yaml), in
cmhash.choices.losses; build one with `build_loss(name, knobs)`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from cmhash.choices.losses import LOSSES
from cmhash.sections import Section

log = logging.getLogger("cmhash")

SMALL_BATCH = 16  # below this a contrastive loss sees too few in-batch negatives to train well


class PairLoss(nn.Module):
    """Base class: checks that x and y are paired [B, D] batches, then calls `pair_loss`."""

    name: str
    contrastive: bool  # True when the loss needs in-batch negatives (so batch size matters)

    def __init__(self, knobs: Section | None = None) -> None:
        super().__init__()
        self.knobs = knobs if knobs is not None else LOSSES.entry(self.name).knobs()  # None: the defaults

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape != y.shape:
            # A row-count mismatch would otherwise pass silently through the B x B logits.
            shapes = f"{tuple(x.shape)}, {tuple(y.shape)}"
            raise ValueError(f"{self.name}: needs two [B, D] tensors of one shape, got {shapes}")
        return self.pair_loss(x, y)

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _cross_modal_logits(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, B] cosine similarities cos(x_i, y_j) / temperature."""
    return F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / temperature


def _symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean of image->text (row) and text->image (column) cross-entropy; positives on diagonal."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class ContrastiveLoss(PairLoss):
    """SimCLR NT-Xent over the 2B stacked embeddings (intra-modal negatives included)."""

    name = "contrastive"
    contrastive = True

    @property
    def temperature(self) -> float:
        return self.knobs.temperature

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        z = F.normalize(torch.cat([x, y]), dim=1)
        logits = z @ z.T / self.temperature
        # An anchor is never its own negative: drop self-similarity from every denominator.
        self_mask = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        # Anchor k < B (image i) has its positive at B + i (text i), and vice versa.
        positives = torch.arange(2 * batch, device=z.device).roll(batch)
        return F.cross_entropy(logits, positives)


class BalancedContrastiveLoss(PairLoss):
    """Cross-modal InfoNCE with positives weighted by S/S1 and negatives by S/S0.

    Averaged over both directions (image->text rows and text->image columns) so that the loss
    is symmetric in the two modalities like every other loss here.
    """

    name = "balanced"
    contrastive = True

    @property
    def temperature(self) -> float:
        return self.knobs.temperature

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        logits = _cross_modal_logits(x, y, self.temperature)
        positives, negatives = batch, batch * (batch - 1)
        weight_pos = (positives + negatives) / positives
        if negatives:  # a batch of one has no negatives to weight
            # w_neg * exp(s) == exp(s + log w_neg): fold the weight into the logits, keep logsumexp.
            off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=logits.device)
            weight_neg = (positives + negatives) / negatives
            logits = logits + off_diagonal.to(logits.dtype) * math.log(weight_neg)
        return weight_pos * _symmetric_cross_entropy(logits)


class InfoNCELoss(PairLoss):
    """CLIP-style symmetric cross-entropy over the B x B cross-modal logits."""

    name = "infonce"
    contrastive = True

    @property
    def temperature(self) -> float:
        return self.knobs.temperature

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _symmetric_cross_entropy(_cross_modal_logits(x, y, self.temperature))


class MSELoss(PairLoss):
    """Mean squared error between paired embeddings (over all B * D entries)."""

    name = "mse"
    contrastive = False

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(x, y)


class CosineLoss(PairLoss):
    """Mean over pairs of 1 - cos(x_i, y_i)."""

    name = "cosine"
    contrastive = False

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(x, y, dim=1)).mean()


class CosineMSELoss(PairLoss):
    """cosine_weight * (1 - cos) + mse_weight * MSE."""

    name = "cosine_mse"
    contrastive = False

    def __init__(self, knobs: Section | None = None) -> None:
        super().__init__(knobs)
        self.cosine = CosineLoss()
        self.mse = MSELoss()

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.knobs
        return k.cosine_weight * self.cosine(x, y) + k.mse_weight * self.mse(x, y)


def build_loss(name: str, knobs: Section | dict | None = None) -> PairLoss:
    """The loss registered as `name`, with `knobs` (its `losses.<name>` section, or a dict of it)."""
    entry = LOSSES.entry(name)
    if not isinstance(knobs, Section):
        knobs = entry.knobs.model_validate(knobs or {})
    return entry.load()(knobs)


def warn_if_small_batch(loss: PairLoss, batch_size: int, minimum: int = SMALL_BATCH) -> str | None:
    """Warn (and return the line) when a contrastive loss gets under `minimum` pairs per batch."""
    if not loss.contrastive or batch_size >= minimum:
        return None
    message = (
        f"loss {loss.name!r} uses in-batch negatives but batch_size is {batch_size} (< {minimum}): "
        "too few negatives to learn well; raise batch_size or use a non-contrastive loss"
    )
    log.warning(message)
    return message
