"""The runner owns the model and the loss: how a batch of CLIP features becomes a loss.

task 0 (fusion):  L(image_emb, text_emb)
task 1 (hash):    L(image_emb, text_emb) + hash_weight * L(image_hash, text_hash)

`views` says which inputs the loss sees: `strict` (each modality encoded alone - what the
honest protocol evaluates), `paired` (both from the pair - the reference's setting), or both.

Under several processes a training step runs as one module call wrapped in DistributedDataParallel
(DDP hooks `forward` and wants one call per backward), and the loss sees the global batch
(cmhash.losses). The step module is the model plus the loss, not the model alone: computing each
view's loss right after its outputs, as one process always has, keeps autograd's order of
summing a parameter's gradients, hence one process's numbers bit for bit. Every view uses every
parameter (both archs, every `inputs`), so DDP need not look for unused ones.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cmhash.models import CrossModalHasher
from cmhash.runtime.distributed import ONE_PROCESS, World

VIEWS = {"strict": ("strict",), "paired": ("paired",), "both": ("strict", "paired")}


class BatchLoss(nn.Module):
    """One batch through the model and the loss: the loss summed over views, and the first view's
    outputs (for monitoring). Under several processes: this rank's rows of the global batch, and
    its part of the global loss (the mean over ranks of the parts is the global loss)."""

    def __init__(self, model: CrossModalHasher, loss: nn.Module, views: tuple[str, ...], hash_weight: float | None, world: World) -> None:
        super().__init__()
        self.model, self.loss_fn, self.views, self.hash_weight, self.world = model, loss, views, hash_weight, world

    def forward(self, image: Tensor, text: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        total, monitored = None, None
        for protocol in self.views:
            emb = self.model.embed(image, text, protocol)
            loss = self.loss_fn(*emb, self.world)
            outputs = emb
            if self.model.image_head is not None:
                outputs = self.model.hash(*emb, image, text)
                loss = loss + self.hash_weight * self.loss_fn(*outputs, self.world)
            total = loss if total is None else total + loss
            if monitored is None:
                monitored = outputs
        return total, monitored


def data_parallel(step: BatchLoss, world: World) -> nn.Module:
    """The step as training calls it: itself on one process, else wrapped in DDP (which starts
    every rank from rank 0's weights and averages the gradients over ranks)."""
    if not world.distributed:
        return step
    device = next(step.parameters()).device
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


class Runner:
    def __init__(self, model: CrossModalHasher, loss: nn.Module, inputs: str, hash_weight: float | None = None,
                 world: World = ONE_PROCESS) -> None:
        self.model, self.loss, self.world = model, loss, world
        self.network = data_parallel(BatchLoss(model, loss, VIEWS[inputs], hash_weight, world), world)  # what training calls
        self.local = BatchLoss(model, loss, VIEWS[inputs], hash_weight, ONE_PROCESS)  # the bare model, for validation

    @property
    def hashing(self) -> bool:
        return self.model.image_head is not None

    def step(self, image: Tensor, text: Tensor, *, local: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """A training step's loss and monitored outputs (see BatchLoss). `local`: the batch on its own,
        through the bare model, nothing gathered (validation, which rank 0 runs alone)."""
        return (self.local if local else self.network)(image, text)
