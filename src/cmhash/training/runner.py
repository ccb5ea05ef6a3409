"""The runner owns the model and the loss: how a batch of CLIP features becomes a loss.

task 0 (fusion):  L(image_emb, text_emb)
task 1 (hash):    L(image_emb, text_emb) + hash_weight * L(image_hash, text_hash)

`views` says which inputs the loss sees: `strict` (each modality encoded alone - what the
honest protocol evaluates), `paired` (both from the pair - the reference's setting), or both.
"""

from __future__ import annotations

from torch import Tensor, nn

from cmhash.models import CrossModalHasher

VIEWS = {"strict": ("strict",), "paired": ("paired",), "both": ("strict", "paired")}


class Runner:
    def __init__(self, model: CrossModalHasher, loss: nn.Module, inputs: str, hash_weight: float | None = None) -> None:
        self.model, self.loss_fn, self.hash_weight = model, loss, hash_weight
        self.views = VIEWS[inputs]

    @property
    def hashing(self) -> bool:
        return self.model.image_head is not None

    def step(self, image: Tensor, text: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The loss summed over views, and the first view's outputs (for monitoring)."""
        total, monitored = None, None
        for protocol in self.views:
            emb = self.model.embed(image, text, protocol)
            loss = self.loss_fn(*emb)
            outputs = emb
            if self.hashing:
                outputs = self.model.hash(*emb)
                loss = loss + self.hash_weight * self.loss_fn(*outputs)
            total = loss if total is None else total + loss
            if monitored is None:
                monitored = outputs
        return total, monitored
