"""Stage `extract`: CLIP features of every image and caption, one .pkl per split.

reads   stages/prepare/{split}.jsonl, labels.json, the images
writes  stages/extract/{train,val,query,retrieval}.pkl  {'image','text','label','ids', ...metadata}
        stages/extract/skipped.jsonl (images that could not be decoded), metrics/extract.json
work    stages/extract_shards/ (next to the output folder, not a DVC output, so DVC leaves it when it
        re-runs the stage): every `clip.shard_size` pairs are saved there as they finish; a re-run
        after an interruption reuses the shards whose settings and pairs match and encodes the rest.
        Removed once the feature files are written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Sequence

import numpy as np
import torch
import typer
from PIL import Image

from cmhash.clip import Clip, load_clip, weights_sha256
from cmhash.config import choose, get, load_params, seed_everything
from cmhash.data.manifest import SPLITS, Item, Skipped, multi_hot, read_split
from cmhash.errors import ConfigError, DataError
from cmhash.io import atomic_write_text, save_pickle, write_json
from cmhash.pipeline import ParamsOption
from cmhash.progress import progress_bar
from cmhash.shards import ShardStore, fingerprint
from cmhash.training.precision import DTYPES, Precision, resolve_device

log = logging.getLogger("cmhash")
BAD_ITEM_POLICIES = ("skip", "fail")
# auto: fp16 autocast on CUDA (CLIP's own inference precision; features are saved as float32
# anyway), fp32 on CPU, where fp16 is not offered and bf16 is slow without native support.
AUTO_PRECISION = {"cuda": "fp16", "cpu": "fp32"}


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a bad file yields a reason instead of a tensor."""

    def __init__(self, paths: list[str], preprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.paths[i]) as im:
                return i, self.preprocess(im.convert("RGB")), ""
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return i, None, f"unreadable image: {type(exc).__name__}: {exc}"


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return idx, images, bad


def _chunks(seq: Sequence, size: int) -> list:
    return [seq[start : start + size] for start in range(0, len(seq), size)]


def load_seeded_clip(model_name: str, pretrained: str, seed: int, device: torch.device) -> Clip:
    """The CLIP encoder as extract builds it. Random-init weights (pretrained: none) are drawn right
    after seeding, so `cmhash index` and `cmhash search` get the same encoder from the same seed."""
    seed_everything(seed)
    clip = load_clip(model_name, pretrained, device)
    if clip.meta["random_init"]:
        clip.meta["seed"] = seed
    return clip


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`clip.precision`: auto (fp16 on CUDA, fp32 on CPU), fp32, bf16 or fp16 (CUDA only)."""
    choose(name, ("auto", *DTYPES), "clip.precision")
    try:
        return Precision(AUTO_PRECISION.get(device.type, "fp32") if name == "auto" else name, device)
    except ConfigError as exc:
        raise ConfigError(f"clip.precision: {exc}") from None


def no_progress(n: int) -> None:
    pass


@dataclass
class Encoder:
    """CLIP on a device, in a precision (autocast), fed by `num_workers` processes that decode images."""

    clip: Clip
    device: torch.device
    batch_size: int = 128
    num_workers: int = 0
    precision: Precision | None = None  # None: fp32

    def _autocast(self):
        return self.precision.autocast() if self.precision else nullcontext()

    @torch.no_grad()
    def image_batches(self, paths: list[str], batches: list[list[int]]) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
        """Per batch of positions into `paths`: the positions decoded, their features [n, D] float32,
        and (position, reason) for each image that could not be decoded."""
        loader = torch.utils.data.DataLoader(
            _ImageFiles(paths, self.clip.preprocess), batch_sampler=batches, num_workers=self.num_workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
        )
        for idx, images, bad in loader:
            feats = np.zeros((0, self.clip.dim), dtype=np.float32)
            if images is not None:
                with self._autocast():
                    feats = self.clip.model.encode_image(images.to(self.device, non_blocking=True)).float().cpu().numpy()
            yield idx.numpy(), feats, bad

    @torch.no_grad()
    def captions(self, captions: list[str]) -> np.ndarray:
        """Text features [n, D] float32 of one batch of captions."""
        if not captions:
            return np.zeros((0, self.clip.dim), dtype=np.float32)
        with self._autocast():
            return self.clip.model.encode_text(self.clip.tokenizer(captions).to(self.device)).float().cpu().numpy()


def encode_images(clip: Clip, paths: list[str], device: torch.device, batch_size: int, num_workers: int, advance=no_progress):
    """Image features [N, D] float32 (None if no image decodes), a decoded mask, and
    (position, reason) for each image that could not be decoded."""
    encoder = Encoder(clip, device, batch_size, num_workers)
    feats_all = np.zeros((len(paths), clip.dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    bad: list[tuple[int, str]] = []
    for idx, feats, failed in encoder.image_batches(paths, _chunks(list(range(len(paths))), batch_size)):
        feats_all[idx], ok[idx] = feats, True
        bad += failed
        advance(len(idx) + len(failed))
    return (feats_all if ok.any() else None), ok, bad


def encode_captions(clip: Clip, captions: list[str], device: torch.device, batch_size: int, advance=no_progress) -> np.ndarray:
    """Text features [N, D] float32."""
    encoder = Encoder(clip, device, batch_size)
    chunks = [np.zeros((0, clip.dim), dtype=np.float32)]
    for chunk in _chunks(captions, batch_size):
        chunks.append(encoder.captions(chunk))
        advance(len(chunk))
    return np.concatenate(chunks)


# --- shards: encode in pieces that survive an interruption ------------------------------------


@dataclass(frozen=True)
class Shard:
    items: list[Item]
    key: str  # fingerprint of the feature settings and of these pairs, in order


def _pair_identity(item: Item) -> list:
    """What a pair's features depend on: the caption, and the image file (path, size, mtime)."""
    try:
        stat = os.stat(item.image)
        stamp = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        stamp = None  # decoding will report it
    return [item.id, item.image, item.caption, stamp]


def plan_shards(items: list[Item], shard_size: int, settings_key: str) -> list[Shard]:
    if shard_size < 1:
        raise ConfigError(f"clip.shard_size must be a positive number of pairs (got {shard_size})")
    return [Shard(chunk, fingerprint(settings_key, [_pair_identity(it) for it in chunk])) for chunk in _chunks(items, shard_size)]


def _encode_shards(encoder: Encoder, shards: list[Shard], advance) -> Iterator[tuple[Shard, dict[str, Any]]]:
    """Encode the pairs of `shards` with one DataLoader (its workers keep decoding across shard
    boundaries); yield each shard's features as soon as its last batch is done."""
    items = [it for shard in shards for it in shard.items]
    batches, owner, start = [], [], 0
    for shard in shards:
        for batch in _chunks(list(range(start, start + len(shard.items))), encoder.batch_size):
            batches.append(batch)
            owner.append((shard, start))
        start += len(shard.items)
    shard_result = None
    for n, (idx, image, bad) in enumerate(encoder.image_batches([it.image for it in items], batches)):
        shard, offset = owner[n]
        if shard_result is None:
            size = len(shard.items)
            shard_result = {"ids": [it.id for it in shard.items], "ok": np.zeros(size, dtype=bool), "skipped": [],
                            "image": np.zeros((size, encoder.clip.dim), np.float32), "text": np.zeros((size, encoder.clip.dim), np.float32)}
        rows = idx - offset
        shard_result["image"][rows], shard_result["ok"][rows] = image, True
        shard_result["text"][rows] = encoder.captions([items[i].caption for i in idx])
        shard_result["skipped"] += [[items[i].id, reason] for i, reason in bad]
        advance(len(idx) + len(bad))
        if n + 1 == len(batches) or owner[n + 1][0] is not shard:
            yield shard, shard_result
            shard_result = None


@dataclass
class Encoded:
    image: np.ndarray  # [N, D] float32, rows of undecodable images are zero
    text: np.ndarray  # [N, D] float32
    ok: np.ndarray  # [N] bool: image decoded
    skipped: list[Skipped]
    shards: int
    reused: int  # shards found finished in the work folder
    encoded_pairs: int  # pairs encoded by this run (not reused)
    seconds: float  # time spent encoding them


def extract_pairs(encoder: Encoder, items: list[Item], shard_size: int, store: ShardStore, settings_key: str,
                  fail_on_bad: bool = False) -> Encoded:
    """Features of every pair, shard by shard: shards already in `store` are reused, every other one
    is saved there as soon as it is done, so an interrupted run loses at most the shard in flight."""
    shards = plan_shards(items, shard_size, settings_key)
    done = {shard.key: found for shard in shards if (found := store.load(shard.key)) is not None}
    if done:
        log.info("extract: reusing %d of %d finished shard(s) from %s", len(done), len(shards), store.folder)
    pending = [shard for shard in shards if shard.key not in done]
    encoded_pairs = sum(len(shard.items) for shard in pending)

    def check(shard_result: dict) -> None:
        if fail_on_bad and shard_result["skipped"]:
            item_id, reason = shard_result["skipped"][0]
            raise DataError(f"bad image {item_id}: {reason} (or set data.on_bad_item: skip to leave such pairs out)")

    for shard_result in done.values():
        check(shard_result)
    started = time.perf_counter()
    with progress_bar("extract", total=encoded_pairs, unit="pair") as advance:
        for shard, shard_result in _encode_shards(encoder, pending, advance):
            store.save(shard.key, shard_result)
            done[shard.key] = shard_result
            check(shard_result)
    seconds = time.perf_counter() - started

    parts = [done[shard.key] for shard in shards]
    image = np.concatenate([np.zeros((0, encoder.clip.dim), np.float32)] + [p["image"] for p in parts])
    text = np.concatenate([np.zeros((0, encoder.clip.dim), np.float32)] + [p["text"] for p in parts])
    ok = np.concatenate([np.zeros(0, bool)] + [p["ok"] for p in parts])
    skipped = [Skipped(item_id, reason) for p in parts for item_id, reason in p["skipped"]]
    return Encoded(image, text, ok, skipped, len(shards), len(shards) - len(pending), encoded_pairs, seconds)


# --- the stage --------------------------------------------------------------------------------


def dataset_info(prepare_dir: Path) -> dict[str, Any]:
    """Which data the features are of: the dataset name, what prepare was run with, and a version
    (fingerprint of labels.json and the split manifests, so any change to ids, paths, captions,
    labels or splits shows)."""
    labels_path = prepare_dir / "labels.json"
    if not labels_path.is_file():
        raise DataError(f"label names not found: {labels_path} (run `cmhash prepare` first)")
    labels = json.loads(labels_path.read_text(encoding="utf-8"))
    files = [labels_path] + [prepare_dir / f"{split}.jsonl" for split in SPLITS]
    contents = [path.read_text(encoding="utf-8") if path.is_file() else None for path in files]
    return {"dataset": labels["dataset"], "dataset_version": fingerprint(contents)[:16],
            "dataset_options": labels.get("options"), "dataset_seed": labels.get("seed"), "label_names": list(labels["labels"])}


def weights_note(meta: dict[str, Any]) -> str:
    if meta["random_init"]:
        return f"RANDOM init (seed {meta['seed']}), not trained CLIP: features and MAP say nothing about real CLIP"
    if "checkpoint_sha256" in meta:
        return f"checkpoint file {meta['pretrained']} (sha256 {meta['checkpoint_sha256']})"
    return f"open_clip pretrained tag '{meta['pretrained']}'"


def shard_folder(out_dir: Path) -> Path:
    """stages/extract -> stages/extract_shards: beside the output folder, never inside it."""
    return out_dir.parent / f"{out_dir.name}_shards"


def run(params: dict, prepare_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    device = resolve_device(str(get(params, "device")))
    precision = resolve_precision(str(get(params, "clip.precision")), device)
    on_bad_item = choose(get(params, "data.on_bad_item"), BAD_ITEM_POLICIES, "data.on_bad_item")
    data = dataset_info(prepare_dir)
    splits = {split: read_split(prepare_dir / f"{split}.jsonl") for split in SPLITS}
    # train/val are subsets of retrieval: encode every distinct item once, then slice per split.
    unique = list({it.id: it for items in splits.values() for it in items}.values())
    position = {it.id: row for row, it in enumerate(unique)}

    clip = load_seeded_clip(str(get(params, "clip.model")), str(get(params, "clip.pretrained")), int(get(params, "seed")), device)
    meta = {**clip.meta, "precision": precision.name}
    if clip.meta["random_init"]:
        meta["weights_sha256"] = weights_sha256(clip.model)  # what the seed drew, on this torch
    # Everything the features depend on besides the pairs themselves (batch size only moves the last bits).
    settings_key = fingerprint(meta, device.type)
    encoder = Encoder(clip, device, int(get(params, "clip.batch_size")), int(get(params, "clip.num_workers")), precision)
    store = ShardStore(shard_folder(out_dir))
    encoded = extract_pairs(encoder, unique, int(get(params, "clip.shard_size")), store, settings_key, fail_on_bad=on_bad_item == "fail")
    if not encoded.ok.any():
        raise DataError("no image could be decoded; check the image paths in stages/prepare/*.jsonl")
    log.info("extract: %d pairs in %d shard(s), %d reused; encoded %d pairs at %.0f pairs/s (%s, %s)", len(unique), encoded.shards,
             encoded.reused, encoded.encoded_pairs, encoded.encoded_pairs / max(encoded.seconds, 1e-9), device, precision.name)

    counts = {}
    for split, items in splits.items():
        rows = np.array([position[it.id] for it in items if encoded.ok[position[it.id]]], dtype=np.int64)
        kept = [unique[r] for r in rows]
        save_pickle(out_dir / f"{split}.pkl", {
            "image": encoded.image[rows],
            "text": encoded.text[rows],
            "label": multi_hot(kept, len(data["label_names"])),
            "ids": [it.id for it in kept],
            "split": split,
            **data,
            **meta,
        })
        counts[split] = len(kept)
    atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps({"id": s.id, "reason": s.reason}) + "\n" for s in encoded.skipped))
    if encoded.skipped:
        log.warning("skipped %d undecodable image(s); see %s", len(encoded.skipped), out_dir / "skipped.jsonl")
    write_json(metrics_path, {
        "clip_model": meta["clip_model"], "pretrained": meta["pretrained"], "random_init": meta["random_init"],
        "weights": weights_note(meta), "precision": precision.name,
        "dataset": data["dataset"], "dataset_version": data["dataset_version"],
        "items": counts, "skipped_images": len(encoded.skipped),
    })
    store.clear()


def command(
    params: ParamsOption = Path("params.yaml"),
    prepare_dir: Annotated[Path, typer.Option(help="manifests written by `cmhash prepare`.")] = Path("stages/prepare"),
    out_dir: Annotated[Path, typer.Option(help="where the feature files go (finished shards wait in <out-dir>_shards).")] = Path("stages/extract"),
    metrics: Annotated[Path, typer.Option(help="small JSON summary (git-tracked).")] = Path("metrics/extract.json"),
) -> None:
    """CLIP features (open_clip) of every image and caption: one .pkl per split. An interrupted run
    resumes: re-run it and only the unfinished shards are encoded."""
    run(load_params(params), prepare_dir, out_dir, metrics)
