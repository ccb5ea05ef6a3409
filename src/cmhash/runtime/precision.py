"""In which precision a model runs: `train.precision` for training, `clip.precision` for extraction.

fp32  no autocast (any device)
bf16  torch.autocast to bfloat16 (CUDA with bf16 support, or CPU); same exponent range as
      fp32, so no loss scaling
fp16  torch.autocast to float16 (CUDA only) with a GradScaler: small fp16 gradients underflow
      to zero unless the loss is scaled up first; steps whose gradients overflow are skipped
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from cmhash.errors import ConfigError

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

class Precision:
    """Autocast, loss scaling and the optimiser step for one precision on one device."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.dtype = DTYPES[name]
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision bf16 is not supported by the GPU on {device}; use fp16 or fp32")
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> AbstractContextManager:
        """Context for the forward pass and loss."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer, params: Iterable[Tensor],
                      clip_grad_norm: float) -> Tensor:
        """Backward, optional global-norm clipping, optimiser step, then zero the grads.
        Returns the total grad norm before clipping as a 0-dim tensor (`.item()` it to log);
        with fp16 it is inf/nan on the steps the scaler skips."""
        params = list(params)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # clip and measure the true gradients, not the scaled ones
        if clip_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state for checkpoints (empty unless fp16)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A run resumed in fp16 from a checkpoint written in another precision has no scaler
        # state yet (torch refuses an empty one): it keeps its fresh scaler.
        if state:
            self.scaler.load_state_dict(state)


# auto: fp16 autocast on CUDA (CLIP's own inference precision; features are saved as float32
# anyway), fp32 on CPU, where fp16 is not offered and bf16 is slow without native support.
AUTO_PRECISION = {"cuda": "fp16", "cpu": "fp32"}


def inference_precision(name: str, device: torch.device) -> Precision:
    """`clip.precision`: auto (fp16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA only)."""
    try:
        return Precision(AUTO_PRECISION.get(device.type, "fp32") if name == "auto" else name, device)
    except ConfigError as exc:
        raise ConfigError(f"clip.precision: {exc}") from None
