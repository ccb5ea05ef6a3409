"""What `cmhash index` can index: a pipeline split (both modalities, from extract's features), a
folder of images, or a captions file. Each source turns its input into items and CLIP features;
CLIP itself loads only once the input has been checked. A hash model trained on precomputed features
of an unknown CLIP model (data.features.clip_model: null) has no encoder: only a split can be indexed."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmhash.data.manifest import SPLITS, read_split
from cmhash.errors import ConfigError, DataError
from cmhash.features.encoding import ClipEncoder
from cmhash.features.store import FeatureSplit, load_features
from cmhash.runtime.progress import progress_bar
from cmhash.search.hashing import HashModel

log = logging.getLogger("cmhash")

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
VERIFY_ITEMS = 4  # split items re-encoded at index time to prove the encoder reproduces extract's features
MIN_COSINE = 0.999  # same encoder up to float noise (CPU vs GPU); another random init scores ~0


@dataclass
class SourceItems:
    items: list[dict[str, Any]]  # id, image and/or caption, labels (names)
    features: dict[str, np.ndarray]  # modality -> CLIP features [N, D], row i = items[i]


@dataclass
class Sources:
    """What a source may need. CLIP loads on first use, after the source has checked its input."""

    hash_model: HashModel
    clip_settings: dict[str, Any]
    device: torch.device
    batch_size: int
    num_workers: int
    features_dir: Path
    prepare_dir: Path

    @property
    def has_encoder(self) -> bool:
        return self.clip_settings.get("clip_model") is not None

    @cached_property
    def encoder(self) -> ClipEncoder:
        if not self.has_encoder:
            raise DataError(f"{self.hash_model.checkpoint} was trained on precomputed features of an unknown CLIP model "
                            "(data.features.clip_model: null): images and captions cannot be encoded; index a split (--split)")
        return ClipEncoder.load(self.clip_settings, self.device, self.batch_size, self.num_workers)

    @property
    def clip_record(self) -> dict[str, Any]:
        """What the index records of the encoder: its settings, or that there is none."""
        return self.encoder.settings if self.has_encoder else {k: self.clip_settings.get(k) for k in ("clip_model", "pretrained", "random_init")}


def _from_split(split: str, ctx: Sources) -> SourceItems:
    """Both modalities of a pipeline split, from extract's features (nothing re-encoded but a check)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    path = ctx.features_dir / f"{split}.pkl"
    feats = load_features(path)
    made_with = {k: feats.meta.get(k) for k in ("clip_model", "pretrained")}
    trained_on = {k: ctx.hash_model.clip_settings.get(k) for k in made_with}
    if made_with != trained_on:
        raise DataError(f"{path} was made with CLIP {made_with} but {ctx.hash_model.checkpoint} was trained on {trained_on}; re-run `dvc repro`")
    if "source_files" in feats.meta:
        return _from_precomputed(feats, path, ctx)
    manifest = {it.id: it for it in read_split(ctx.prepare_dir / f"{split}.jsonl")}
    missing = [i for i in feats.meta["ids"] if i not in manifest]
    if missing:
        raise DataError(f"{path} has item {missing[0]} that {ctx.prepare_dir / f'{split}.jsonl'} lacks; re-run `dvc repro`")
    _check_same_encoder(feats, path, ctx)
    names = list(feats.meta["label_names"])
    items = [manifest[i] for i in feats.meta["ids"]]
    image, text = feats.image.numpy(), feats.text.numpy()
    _check_encoder_reproduces(ctx.encoder, items[:VERIFY_ITEMS], image, text, path)
    rows = [{"id": it.id, "image": it.image, "caption": it.caption, "labels": [names[c] for c in it.labels]} for it in items]
    return SourceItems(rows, {"image": image, "text": text})


def _from_precomputed(feats: FeatureSplit, path: Path, ctx: Sources) -> SourceItems:
    """A split of precomputed features (data.name: features): ids and labels, and the captions and
    image paths where the layout kept them (clip_retrieval); nothing to re-encode as a check."""
    if ctx.has_encoder:
        _check_same_encoder(feats, path, ctx)
    names = list(feats.meta["label_names"])
    labels = feats.label.numpy()
    rows = [{"id": i, "labels": [names[c] for c in np.flatnonzero(row)]} for i, row in zip(feats.meta["ids"], labels, strict=True)]
    for key, field in (("captions", "caption"), ("images", "image")):  # kept where the layout has them (clip_retrieval)
        for row, value in zip(rows, feats.meta.get(key) or [], strict=False):
            row[field] = value
    return SourceItems(rows, {"image": feats.image.numpy(), "text": feats.text.numpy()})


def _check_same_encoder(feats: FeatureSplit, path: Path, ctx: Sources) -> None:
    for key in ("seed", "weights_sha256", "checkpoint_sha256"):  # recorded by extract: the encoder must be the same
        if feats.meta.get(key) is not None and feats.meta[key] != ctx.encoder.settings.get(key):
            raise DataError(f"{path} was extracted with CLIP {key} {feats.meta[key]}, the index would encode queries with "
                            f"{ctx.encoder.settings.get(key)}; set params.yaml back to what extract used, or re-run `dvc repro`")


def _check_encoder_reproduces(encoder: ClipEncoder, items, image: np.ndarray, text: np.ndarray, path: Path) -> None:
    """Queries are encoded at search time by the encoder rebuilt here: it must give extract's features
    (a random-init CLIP differs with the seed; real weights differ with the file)."""
    n = len(items)
    fresh_image, ok, _ = encoder.images([it.image for it in items])  # an image gone since extract is not checked
    fresh = np.concatenate([encoder.captions([it.caption for it in items]), fresh_image[ok] if ok.any() else image[:0]])
    stored = np.concatenate([text[:n], image[:n][ok]])
    cosine = float(np.min(np.sum(_unit(fresh) * _unit(stored), axis=1)))
    if cosine < MIN_COSINE:
        raise DataError(f"CLIP rebuilt from seed {encoder.settings['seed']} does not reproduce {path} (cosine {cosine:.3f}); "
                        "index with the seed and clip settings extract used, or re-run `dvc repro`")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _from_images(folder: Path, ctx: Sources) -> SourceItems:
    """Image codes of every image file under `folder` (recursive, sorted); unreadable ones are skipped."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"no image files ({' '.join(IMAGE_SUFFIXES)}) under {folder}")
    encoder = ctx.encoder  # loaded (or refused) before the progress bar shows
    with progress_bar("index images", total=len(paths), unit="img") as advance:
        feats, ok, bad = encoder.images([str(p) for p in paths], advance)
    if feats is None:
        raise DataError(f"none of the {len(paths)} image files under {folder} could be read, first: {paths[bad[0][0]]}: {bad[0][1]}")
    if bad:
        log.warning("skipped %d unreadable image(s), first: %s: %s", len(bad), paths[bad[0][0]], bad[0][1])
    keep = np.flatnonzero(ok)
    return SourceItems([{"id": paths[i].relative_to(folder).as_posix(), "image": str(paths[i])} for i in keep], {"image": feats[keep]})


def _read_captions(path: Path) -> list[dict[str, Any]]:
    """One caption per line, or JSONL lines holding a string or {"caption", "id"?, "labels"?}."""
    if not path.is_file():
        raise DataError(f"captions file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row: Any = line.strip()
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{lineno}: not JSON ({exc})") from None
        row = {"caption": row} if isinstance(row, str) else row
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise DataError(f'{path}:{lineno}: expected a non-empty caption (a string or {{"caption": "...", "id": ..., "labels": [...]}})')
        rows.append({"id": str(row.get("id", lineno)), "caption": row["caption"], "labels": [str(x) for x in row.get("labels", [])]})
    if not rows:
        raise DataError(f"no captions in {path}")
    return rows


def _from_captions(path: Path, ctx: Sources) -> SourceItems:
    rows = _read_captions(path)
    encoder = ctx.encoder  # loaded (or refused) before the progress bar shows
    with progress_bar("index captions", total=len(rows), unit="cap") as advance:
        feats = encoder.captions([r["caption"] for r in rows], advance)
    return SourceItems(rows, {"text": feats})


SOURCES: dict[str, Callable[[Any, Sources], SourceItems]] = {"split": _from_split, "images": _from_images, "captions": _from_captions}


