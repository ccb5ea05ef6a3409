"""Extraction in resumable shards: every `shard_size` pairs are encoded and saved to a work
folder as they finish, so an interrupted run re-encodes only the shards it had not finished."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmhash.data.manifest import Item, Skipped
from cmhash.encoding import Encoder, chunks
from cmhash.errors import DataError
from cmhash.progress import progress_bar
from cmhash.shards import ShardStore, fingerprint

log = logging.getLogger("cmhash")


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
    return [Shard(chunk, fingerprint(settings_key, [_pair_identity(it) for it in chunk])) for chunk in chunks(items, shard_size)]


def _encode_shards(encoder: Encoder, shards: list[Shard], advance) -> Iterator[tuple[Shard, dict[str, Any]]]:
    """Encode the pairs of `shards` with one DataLoader (its workers keep decoding across shard
    boundaries); yield each shard's features as soon as its last batch is done."""
    items = [it for shard in shards for it in shard.items]
    batches, owner, start = [], [], 0
    for shard in shards:
        for batch in chunks(list(range(start, start + len(shard.items))), encoder.batch_size):
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


