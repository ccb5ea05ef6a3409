"""Loss-independent numbers that make runs with different losses comparable."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor

from cmhash.runtime.distributed import all_gather_objects


@torch.no_grad()
def pair_stats(x: Tensor, y: Tensor) -> dict[str, float]:
    """For a batch of paired outputs (row i of x belongs with row i of y):
    mean cosine of true pairs, in-batch top-1 retrieval accuracy both ways (chance = 1/B), MSE."""
    x, y = x.float(), y.float()
    sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    target = torch.arange(len(x), device=x.device)
    return {
        "pair_cos": sim.diagonal().mean().item(),
        "top1_i2t": (sim.argmax(dim=1) == target).float().mean().item(),
        "top1_t2i": (sim.argmax(dim=0) == target).float().mean().item(),
        "mse": F.mse_loss(x, y).item(),
    }


class Meter:
    """Batch-size-weighted means of per-batch numbers; a number left out of a batch (e.g. the
    grad norm of a step the fp16 scaler skipped) is averaged over the batches that have it."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, n: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] += n * value
            self.counts[key] += n

    def summed_over_ranks(self) -> Meter:
        """The whole job's meter: every rank's sums and counts added in rank order (on one
        process, this meter's numbers as they are)."""
        (first_sums, first_counts), *others = all_gather_objects((dict(self.sums), dict(self.counts)))
        total = Meter()
        total.sums.update(first_sums)
        total.counts.update(first_counts)
        for sums, counts in others:
            for key, value in sums.items():
                total.sums[key] += value
                total.counts[key] += counts[key]
        return total

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{key}": total / self.counts[key] for key, total in self.sums.items()}
