"""Pair losses between image-side embeddings x [B, D] and text-side embeddings y [B, D].

Row i of x is paired with row i of y; every other row of the batch is a negative for the
contrastive losses. All losses here are symmetric: swapping x and y leaves the value unchanged.
Each is registered by name, with its knobs (`losses.<name>` in params.yaml), in
cmhash.config.choices.losses; build one with `build_loss(name, knobs)`.

Under several processes (DDP) each rank holds b = B/W rows of the global batch of B. A
contrastive loss then gathers both modalities' rows from every rank (with gradient) and scores
its own rows against the whole global batch, positives at the rank's offset: the mean over ranks
of these per-rank losses is the one-process loss on the global batch, and DDP's averaged
gradients are its gradients. Pair losses need nothing from other ranks (a mean of equal-sized
means is the global mean). The one-process formula (`pair_loss`) and the sharded one
(`sharded_loss`) are written side by side.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from cmhash.config.choices.losses import LOSSES
from cmhash.config.fields import Section
from cmhash.runtime.distributed import ONE_PROCESS, World, gather_rows_with_grad

log = logging.getLogger("cmhash")

SMALL_BATCH = 16  # below this a contrastive loss sees too few in-batch negatives to train well


class PairLoss(nn.Module):
    """Base class: checks that x and y are paired [B, D] batches, then calls `pair_loss`."""

    name: str
    contrastive: bool  # True when the loss needs in-batch negatives (so batch size matters)

    def __init__(self, knobs: Section | None = None) -> None:
        super().__init__()
        self.knobs = knobs if knobs is not None else LOSSES.entry(self.name).knobs()  # None: the defaults

    def forward(self, x: torch.Tensor, y: torch.Tensor, world: World = ONE_PROCESS) -> torch.Tensor:
        """The loss of the batch; under several processes, this rank's part of the global batch's
        loss (x, y: this rank's rows; the parts' mean over ranks is the global loss)."""
        if x.ndim != 2 or x.shape != y.shape:
            # A row-count mismatch would otherwise pass silently through the B x B logits.
            shapes = f"{tuple(x.shape)}, {tuple(y.shape)}"
            raise ValueError(f"{self.name}: needs two [B, D] tensors of one shape, got {shapes}")
        if world.distributed and self.contrastive:
            return self.sharded_loss(x, y, gather_rows_with_grad(x), gather_rows_with_grad(y), world.rank * x.shape[0])
        return self.pair_loss(x, y)

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sharded_loss(self, x: torch.Tensor, y: torch.Tensor, all_x: torch.Tensor, all_y: torch.Tensor, first: int) -> torch.Tensor:
        """Contrastive losses: the mean over this rank's rows (x, y: [b, D], global rows first..first+b-1)
        of their terms in the global batch (all_x, all_y: [B, D], every rank's rows in rank order)."""
        raise NotImplementedError


def _cross_modal_logits(x: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, B] cosine similarities cos(x_i, y_j) / temperature ([b, B] for b rows of x against B of y)."""
    return F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / temperature


def _symmetric_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean of image->text (row) and text->image (column) cross-entropy; positives on diagonal."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _sharded_targets(rows: int, first: int, device: torch.device) -> torch.Tensor:
    """Global indices of this rank's rows: where their positives sit in the gathered batch."""
    return torch.arange(first, first + rows, device=device)


def _sharded_symmetric_cross_entropy(image_rows: torch.Tensor, text_rows: torch.Tensor, first: int) -> torch.Tensor:
    """_symmetric_cross_entropy's terms for this rank's rows: image_rows [b, B] are its rows of
    the global logits, text_rows [b, B] its rows of their transpose (its texts against all images)."""
    targets = _sharded_targets(image_rows.shape[0], first, image_rows.device)
    return (F.cross_entropy(image_rows, targets) + F.cross_entropy(text_rows, targets)) / 2


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

    def sharded_loss(self, x: torch.Tensor, y: torch.Tensor, all_x: torch.Tensor, all_y: torch.Tensor, first: int) -> torch.Tensor:
        batch, rows = all_x.shape[0], x.shape[0]
        z = F.normalize(torch.cat([all_x, all_y]), dim=1)  # [2B, D]: every image, then every text
        # This rank's anchors: its images (global index first + i), then its texts (B + first + i).
        image_rows = _sharded_targets(rows, first, z.device)
        anchors = torch.cat([image_rows, batch + image_rows])
        logits = z[anchors] @ z.T / self.temperature
        logits = logits.masked_fill(F.one_hot(anchors, 2 * batch).bool(), float("-inf"))
        return F.cross_entropy(logits, anchors.roll(rows))  # image anchor i <-> text anchor i


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

    def sharded_loss(self, x: torch.Tensor, y: torch.Tensor, all_x: torch.Tensor, all_y: torch.Tensor, first: int) -> torch.Tensor:
        batch = all_x.shape[0]  # the weights count the global batch's pairs (B >= 2: one per rank at least)
        positives, negatives = batch, batch * (batch - 1)
        weight_pos, weight_neg = (positives + negatives) / positives, (positives + negatives) / negatives
        positive = F.one_hot(_sharded_targets(x.shape[0], first, x.device), batch).bool()
        image_rows = _cross_modal_logits(x, all_y, self.temperature)
        text_rows = _cross_modal_logits(y, all_x, self.temperature)
        weight = (~positive).to(image_rows.dtype) * math.log(weight_neg)  # on the negatives, as pair_loss
        return weight_pos * _sharded_symmetric_cross_entropy(image_rows + weight, text_rows + weight, first)


class InfoNCELoss(PairLoss):
    """CLIP-style symmetric cross-entropy over the B x B cross-modal logits."""

    name = "infonce"
    contrastive = True

    @property
    def temperature(self) -> float:
        return self.knobs.temperature

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _symmetric_cross_entropy(_cross_modal_logits(x, y, self.temperature))

    def sharded_loss(self, x: torch.Tensor, y: torch.Tensor, all_x: torch.Tensor, all_y: torch.Tensor, first: int) -> torch.Tensor:
        image_rows = _cross_modal_logits(x, all_y, self.temperature)
        text_rows = _cross_modal_logits(y, all_x, self.temperature)
        return _sharded_symmetric_cross_entropy(image_rows, text_rows, first)


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
