"""Extraction in resumable shards: every `shard_size` pairs (every tar shard, for webdataset
input) are encoded and saved to a work folder as they finish, so an interrupted run re-encodes only the shards it had not finished.
Under torchrun the shards are shared out among the ranks, and rank 0 collects them from the folder."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmhash.data.manifest import Item, Skipped
from cmhash.data.tar_shards import split_member_ref
from cmhash.digests import digest
from cmhash.errors import DataError
from cmhash.features.encoding import Encoder, chunks, no_progress
from cmhash.features.shards import ShardStore
from cmhash.runtime.distributed import ONE_PROCESS, World, all_gather_objects
from cmhash.runtime.progress import progress_bar

log = logging.getLogger("cmhash")


@dataclass(frozen=True)
class Shard:
    items: list[Item]
    key: str  # fingerprint of the feature settings and of these pairs, in order


def _pair_identity(item: Item) -> list:
    """What a pair's features depend on: the caption, and the image file (path, size, mtime); for a
    member of a tar shard, the shard file's."""
    ref = split_member_ref(item.image)
    try:
        stat = os.stat(ref[0] if ref else item.image)
        stamp = [stat.st_size, stat.st_mtime_ns]
    except OSError:
        stamp = None  # decoding will report it
    return [item.id, item.image, item.caption, stamp]


def _groups(items: list[Item], shard_size: int) -> list[list[Item]]:
    """Members of tar shards: one extraction shard per tar shard, so each is streamed once and a
    re-run resumes tar by tar. Image files: every `shard_size` pairs."""
    by_tar: dict[str, list[Item]] = {}
    for item in items:
        if (ref := split_member_ref(item.image)) is None:
            return chunks(items, shard_size)
        by_tar.setdefault(ref[0], []).append(item)
    return list(by_tar.values())


def plan_shards(items: list[Item], shard_size: int, settings_key: str) -> list[Shard]:
    return [Shard(group, digest(settings_key, [_pair_identity(it) for it in group])) for group in _groups(items, shard_size)]


def _encode_shards(encoder: Encoder, shards: list[Shard], advance) -> Iterator[tuple[Shard, dict[str, Any]]]:
    """Encode the pairs of `shards` with one DataLoader (its workers keep decoding across shard
    boundaries); yield each shard's features as soon as its last batch is done (tar shards, read by
    several workers at once, may finish in any order)."""
    items = [it for shard in shards for it in shard.items]
    groups, owner, start = [], {}, 0
    for n, shard in enumerate(shards):
        groups.append(list(range(start, start + len(shard.items))))
        owner.update(dict.fromkeys(groups[-1], n))
        start += len(shard.items)
    results: dict[int, dict[str, Any]] = {}
    left = [len(group) for group in groups]
    for idx, image, bad in encoder.grouped_batches([it.image for it in items], groups):
        n = owner[int(idx[0])] if len(idx) else owner[bad[0][0]]
        shard, offset = shards[n], groups[n][0]
        if n not in results:
            size = len(shard.items)
            results[n] = {"ids": [it.id for it in shard.items], "ok": np.zeros(size, dtype=bool), "skipped": [],
                          "image": np.zeros((size, encoder.clip.dim), np.float32), "text": np.zeros((size, encoder.clip.dim), np.float32)}
        result, rows = results[n], idx - offset
        result["image"][rows], result["ok"][rows] = image, True
        result["text"][rows] = encoder.captions([items[i].caption for i in idx])
        result["skipped"] += [[items[i].id, reason] for i, reason in bad]
        advance(len(idx) + len(bad))
        left[n] -= len(idx) + len(bad)
        if not left[n]:
            yield shard, results.pop(n)


@dataclass
class Encoded:
    image: np.ndarray  # [N, D] float32, rows of undecodable images are zero
    text: np.ndarray  # [N, D] float32
    ok: np.ndarray  # [N] bool: image decoded
    skipped: list[Skipped]
    shards: int
    reused: int  # shards found finished in the work folder
    encoded_pairs: int  # pairs encoded by this run (not reused), by all ranks
    seconds: float  # time spent encoding them (by the slowest rank)


def extract_pairs(encoder: Encoder, items: list[Item], shard_size: int, store: ShardStore, settings_key: str,
                  fail_on_bad: bool = False, world: World = ONE_PROCESS) -> Encoded | None:
    """Features of every pair, shard by shard: shards already in `store` are reused, every other one
    is saved there as soon as it is done, so an interrupted run loses at most the shard in flight.
    Several processes (torchrun, `world`): rank r encodes shards r, r+W, r+2W... of the plan; once
    every rank is done, rank 0 reads the others' shards from `store` (a folder every rank sees) and
    returns the features; the other ranks return None."""
    shards = plan_shards(items, shard_size, settings_key)
    # Shares fixed by the plan alone: no rank needs to know what the others find finished.
    mine = shards[world.rank :: world.size]
    label = f"rank {world.rank} of {world.size}: " if world.distributed else ""
    done = {shard.key: found for shard in mine if (found := store.load(shard.key)) is not None}
    if done:
        log.info("extract: %sreusing %d of %d finished shard(s) from %s", label, len(done), len(mine), store.folder)
    pending = [shard for shard in mine if shard.key not in done]
    encoded_pairs = sum(len(shard.items) for shard in pending)

    image_of = {it.id: it.image for it in items}

    def check(shard_result: dict) -> None:
        if fail_on_bad and shard_result["skipped"]:
            item_id, reason = shard_result["skipped"][0]
            where = f" in {ref[0]}" if (ref := split_member_ref(image_of[item_id])) else ""
            raise DataError(f"bad image {item_id}{where}: {reason} (or set data.on_bad_item: skip to leave such pairs out)")

    for shard_result in done.values():
        check(shard_result)
    started = time.perf_counter()
    with _progress(world, encoded_pairs) as advance:
        for shard, shard_result in _encode_shards(encoder, pending, advance):
            store.save(shard.key, shard_result)
            done[shard.key] = shard_result
            check(shard_result)
    seconds = time.perf_counter() - started

    # Waits for every rank: after it, every shard is in `store`.
    work = all_gather_objects((len(mine) - len(pending), encoded_pairs, seconds))
    if not world.main:
        return None
    reused, encoded_pairs, seconds = sum(w[0] for w in work), sum(w[1] for w in work), max(w[2] for w in work)
    for n, shard in enumerate(shards):
        if shard.key not in done:  # another rank's
            done[shard.key] = _finished_elsewhere(store, shard, n % world.size, world.size)
    parts = [done[shard.key] for shard in shards]
    image = np.concatenate([np.zeros((0, encoder.clip.dim), np.float32)] + [p["image"] for p in parts])
    text = np.concatenate([np.zeros((0, encoder.clip.dim), np.float32)] + [p["text"] for p in parts])
    ok = np.concatenate([np.zeros(0, bool)] + [p["ok"] for p in parts])
    skipped = [Skipped(item_id, reason) for p in parts for item_id, reason in p["skipped"]]
    return Encoded(image, text, ok, skipped, len(shards), reused, encoded_pairs, seconds)


@contextmanager
def _progress(world: World, pairs: int) -> Iterator:
    """One progress bar, rank 0's (several bars redrawn in one terminal garble each other)."""
    if not world.main:
        yield no_progress
        return
    with progress_bar(f"extract (rank 0 of {world.size})" if world.distributed else "extract", total=pairs, unit="pair") as advance:
        yield advance


def _finished_elsewhere(store: ShardStore, shard: Shard, rank: int, size: int) -> dict[str, Any]:
    found = store.load(shard.key)
    if found is None:
        raise DataError(f"shard {store.path(shard.key)}, encoded by rank {rank} of {size}, is not there: every node "
                        "must see the same working directory (stages/ on a shared filesystem)")
    return found


