"""Feature augmentation (params.yaml `train.augment`), a regulariser on CLIP features: gaussian
noise of std `noise_std` added to every feature, and/or feature dropout - each feature zeroed
with probability `dropout`, the others scaled by 1 / (1 - dropout) so the expected feature is
unchanged. Train batches only (validation never calls it); off (both 0) it returns the batch
as it is and draws nothing, so the run is exactly one without it.

The draws come from the batch-order generator (seeded with `seed`, saved in last.pt), so a run
is deterministic given its seed and resumes exactly. Under several processes the noise is drawn
for the whole global batch and each rank takes its own rows: the ranks' rows together are the
one-process batch, and every rank's generator stays in step."""

from __future__ import annotations

import torch
from torch import Tensor

from cmhash.config.schema import AugmentConfig
from cmhash.runtime.distributed import ONE_PROCESS, World


class FeatureAugment:
    def __init__(self, cfg: AugmentConfig, generator: torch.Generator, world: World = ONE_PROCESS) -> None:
        self.cfg, self.generator, self.world = cfg, generator, world

    def __call__(self, image: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        if not self.cfg.on:
            return image, text
        return self._one(image), self._one(text)

    def _one(self, x: Tensor) -> Tensor:
        rows = slice(self.world.rank * len(x), (self.world.rank + 1) * len(x))  # this rank's share of the global batch
        shape = (len(x) * self.world.size, *x.shape[1:])
        if self.cfg.noise_std:
            x = x + self.cfg.noise_std * torch.randn(shape, generator=self.generator)[rows].to(x.device, x.dtype)
        if self.cfg.dropout:
            keep = torch.rand(shape, generator=self.generator)[rows] >= self.cfg.dropout
            x = x * keep.to(x.device, x.dtype) / (1 - self.cfg.dropout)
        return x
