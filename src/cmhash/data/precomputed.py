"""Precomputed features (`data.name: features`) as `prepare` hands them to `extract`, checked and
normalised, one file per split:

    stages/prepare/features/<split>.npz   image, text float32 [N, D]; label uint8 [N, C] (C = 0: no labels);
                                          ids str [N]; captions, images str [N] where the layout has them
    stages/prepare/labels.json            {"dataset": "features", "options": {...}, "seed": N,
                                           "precomputed": {"format", "sources": {file: sha256}, "val"},
                                           "labels": ["label0", ...]}

`precomputed` is what tells extract to write these arrays out instead of running CLIP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmhash.data.manifest import SPLITS, write_label_names
from cmhash.errors import DataError
from cmhash.io import atomic_path, file_sha256

FOLDER = "features"


@dataclass
class SplitArrays:
    image: np.ndarray  # float32 [N, D]
    text: np.ndarray  # float32 [N, D]
    label: np.ndarray  # uint8 [N, C], multi-hot
    ids: list[str]  # "<source split>/<row in the source file>": stable, unique per pair
    captions: list[str] | None = None  # kept for search where the layout has them (clip_retrieval)
    images: list[str] | None = None  # image paths or urls, likewise

    def rows(self, rows: np.ndarray) -> SplitArrays:
        pick = lambda values: None if values is None else [values[r] for r in rows]  # noqa: E731
        return SplitArrays(self.image[rows], self.text[rows], self.label[rows], pick(self.ids), pick(self.captions), pick(self.images))


@dataclass
class FeatureSet:
    """What the `features` importer returns: every split, checked."""

    splits: dict[str, SplitArrays]
    label_names: list[str]
    format: str  # pickle | npz | mat | clip_retrieval
    sources: dict[str, str]  # source file (relative to data.root) -> SHA-256 of its bytes
    val: str  # "given" (the files have a val split) or "carved from train"


def save(out_dir: Path, features: FeatureSet, **about: Any) -> None:
    """The arrays and labels.json into prepare's folder; `about`: options and seed, as for any dataset.
    Call inside all_or_nothing."""
    for split, arrays in features.splits.items():
        with atomic_path(out_dir / FOLDER / f"{split}.npz") as tmp, tmp.open("wb") as f:
            texts = {name: np.array(values, dtype=str) for name, values in (("captions", arrays.captions), ("images", arrays.images))
                     if values is not None}
            np.savez(f, image=arrays.image, text=arrays.text, label=arrays.label, ids=np.array(arrays.ids, dtype=str), **texts)
    precomputed = {"format": features.format, "sources": features.sources, "val": features.val}
    write_label_names(out_dir / "labels.json", "features", features.label_names, **about, precomputed=precomputed)


def prepared(prepare_dir: Path) -> dict[str, Any] | None:
    """labels.json, if prepare precomputed features; None for a dataset of images (or no labels.json yet)."""
    path = prepare_dir / "labels.json"
    labels = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return labels if "precomputed" in labels else None


def load(prepare_dir: Path, split: str) -> SplitArrays:
    path = prepare_dir / FOLDER / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"precomputed features not found: {path} (run `cmhash prepare` first)")
    with np.load(path, allow_pickle=False) as z:
        texts = {name: [str(v) for v in z[name]] for name in ("captions", "images") if name in z.files}
        return SplitArrays(z["image"], z["text"], z["label"], [str(i) for i in z["ids"]], **texts)


def digests(prepare_dir: Path) -> list[str]:
    """SHA-256 of each split's arrays, in split order: part of the dataset version."""
    return [file_sha256(prepare_dir / FOLDER / f"{split}.npz") for split in SPLITS]
