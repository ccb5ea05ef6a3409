"""Codes for images and captions, made exactly as the pipeline made the database's: CLIP features
(the encoder extract builds, from the same seed) -> the hash model under the strict protocol
(an image from the image alone, a caption from the caption alone) -> sign."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmhash.clip import Clip, load_seeded_clip, weights_sha256
from cmhash.encoding import encode_captions, encode_images, no_progress
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


@dataclass
class ClipEncoder:
    clip: Clip
    seed: int
    device: torch.device
    batch_size: int = 1
    num_workers: int = 0

    @classmethod
    def load(cls, settings: dict[str, Any], device: torch.device, batch_size: int = 1, num_workers: int = 0) -> ClipEncoder:
        """settings: {clip_model, pretrained, seed[, checkpoint_sha256, weights_sha256]}, as an index
        or a feature file records them; a recorded digest must match the weights rebuilt here."""
        seed = int(settings["seed"])
        clip = load_seeded_clip(str(settings["clip_model"]), str(settings["pretrained"]), seed, device)
        if clip.meta["random_init"]:  # drawn from the seed: record which weights it drew (on this torch)
            clip.meta["weights_sha256"] = weights_sha256(clip.model)
        for digest in ("checkpoint_sha256", "weights_sha256"):
            if settings.get(digest) and clip.meta.get(digest) != settings[digest]:
                raise DataError(f"CLIP {settings['clip_model']} ({settings['pretrained']}, seed {seed}) does not rebuild the weights "
                                f"recorded ({digest} differs: another seed, weights file or torch version); rebuild with the settings extract used")
        return cls(clip, seed, device, batch_size, num_workers)

    @property
    def settings(self) -> dict[str, Any]:
        """What an index records to rebuild this encoder: the CLIP model, its weights, the seed."""
        return {**{k: v for k, v in self.clip.meta.items() if k != "preprocess"}, "seed": self.seed}

    def images(self, paths: list[str], advance=no_progress) -> tuple[np.ndarray | None, np.ndarray, list[tuple[int, str]]]:
        return encode_images(self.clip, paths, self.device, self.batch_size, self.num_workers, advance)

    def captions(self, captions: list[str], advance=no_progress) -> np.ndarray:
        return encode_captions(self.clip, captions, self.device, self.batch_size, advance)

    @torch.inference_mode()
    def image(self, image: Image.Image) -> np.ndarray:
        """Features [1, D] of one decoded RGB image (a query), preprocessed as extract preprocesses files."""
        pixels = self.clip.preprocess(image)[None].to(self.device)
        return self.clip.model.encode_image(pixels).float().cpu().numpy()
