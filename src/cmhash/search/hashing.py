"""A query's code, made exactly as the pipeline made the database's: its CLIP features (from
cmhash.features.encoding's encoder) -> the hash model under the strict protocol (an image from the
image alone, a caption from the caption alone) -> sign."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmhash.errors import DataError
from cmhash.io import file_sha256
from cmhash.models import CrossModalHasher, encode, load_checkpoint, to_codes

SLOT = {"image": 0, "text": 1}  # position of each modality in the model's (image, text) inputs and outputs


@dataclass
class HashModel:
    model: CrossModalHasher
    checkpoint: Path
    sha256: str

    @property
    def bits(self) -> int:
        return int(self.model.config.bits)

    @property
    def clip_settings(self) -> dict[str, Any]:
        """What the training features were made with: {clip_model, pretrained, random_init}."""
        return dict(self.model.config.clip)

    def codes(self, features: np.ndarray, modality: str) -> np.ndarray:
        """±1 int8 codes [N, bits] of one modality's CLIP features; the other input slot stays zero."""
        device = next(self.model.parameters()).device
        inputs = [torch.zeros(len(features), self.model.config.feature_dim, device=device) for _ in SLOT]
        inputs[SLOT[modality]] = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
        outputs = encode(self.model, *inputs, protocol="strict")
        return to_codes(outputs[SLOT[modality]]).cpu().numpy()


def load_hash_model(checkpoint: Path, device: torch.device) -> HashModel:
    model, _ = load_checkpoint(checkpoint, device)
    if not model.config.bits:
        raise DataError(f"{checkpoint} is a fusion (task 0) checkpoint without hash heads; use stages/hash/<bits>/model.pt")
    return HashModel(model, Path(checkpoint), file_sha256(Path(checkpoint)))
