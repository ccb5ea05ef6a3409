"""Feature files (`stages/extract/<split>.pkl`) loaded onto the device, checked on the way in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cmhash.errors import DataError
from cmhash.io import load_pickle


@dataclass
class FeatureSplit:
    image: Tensor  # [N, D] float32
    text: Tensor  # [N, D] float32
    label: Tensor  # [N, C] multi-hot
    meta: dict[str, Any]  # everything else in the file: ids, CLIP model, weights, dataset, split

    def __len__(self) -> int:
        return len(self.image)

    @property
    def dim(self) -> int:
        return self.image.shape[1]


def load_features(path: Path | str, device: torch.device | str = "cpu") -> FeatureSplit:
    data = load_pickle(path)
    if not isinstance(data, dict) or not {"image", "text", "label"} <= data.keys():
        raise DataError(f"{path}: a feature file must be a dict with 'image', 'text' and 'label'")
    image, text, label = (np.asarray(data[k]) for k in ("image", "text", "label"))
    for key, array in (("image", image), ("text", text), ("label", label)):
        # strings or objects would be cast (or fail) far from here; say which file and key instead
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path}: '{key}' holds {array.dtype} values, not numbers; re-run `cmhash extract`")
    if image.ndim != 2 or image.shape != text.shape:
        raise DataError(f"{path}: 'image' {image.shape} and 'text' {text.shape} must both be [N, D]")
    if label.ndim != 2 or len(label) != len(image):
        raise DataError(f"{path}: 'label' {label.shape} must be [N, C] with N = {len(image)} (one row per pair)")
    if len(image) == 0 or image.shape[1] == 0:
        raise DataError(f"{path}: 'image' and 'text' are empty {image.shape}; re-run `cmhash extract`")
    if not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise DataError(f"{path}: features contain NaN or inf; re-run `cmhash extract`")
    meta = {k: v for k, v in data.items() if k not in ("image", "text", "label")}
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
    return FeatureSplit(as_tensor(image), as_tensor(text), as_tensor(label), meta)


def check_width(features: FeatureSplit, path: Path | str, checkpoint: Path | str, feature_dim: int) -> None:
    """Features must be as wide as the model that reads them was trained on (the same CLIP)."""
    if features.dim != feature_dim:
        raise DataError(f"{path}: features are {features.dim} wide but {checkpoint} was trained on {feature_dim}; "
                        "extract with the same clip.model, or retrain")
