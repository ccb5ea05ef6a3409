"""Webdataset tar shards as img2dataset writes them (`data.name: webdataset`), from `data.root`:
a folder (its *.tar), a brace pattern (`shards/{00000..00009}.tar`) or several joined by `::`.

    00000.tar        000000000.jpg  000000000.txt  000000000.json  000000001.jpg ...
    00000.parquet    00000_stats.json   (beside each shard; not read)

A pair is a key's image member (jpg, jpeg, png or webp), its caption `<key>.txt` and, with
`label_field`, its labels: that field of `<key>.json` (a list of tags, or one class id). Without
`label_field` the collection is unlabelled. Images are not read here: the manifest points into the
shard (`00000.tar#000000000.jpg`) and extract decodes them from the stream.

Splits stay put when shards are added: a pair's split follows from its shard's name or from a
seeded hash of its key alone. Query: the pairs of `query_shards`, or else the keys whose hash falls
in the first `query_fraction`. Val: the pairs of `val_shards`, or else, of the pairs not in query,
the keys whose hash falls in the next `val_fraction`. Train: of the pairs in neither, the
`train_fraction` drawn by a second hash of the key. Retrieval: every pair not in query.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cmhash.config.choices.datasets import WebDataset
from cmhash.data.datasets.common import ItemSink
from cmhash.data.manifest import Collection
from cmhash.data.tar_shards import CAPTION_EXT, IMAGE_EXTS, META_EXT, ShardReader, list_shards, member_key, member_ref
from cmhash.errors import DataError

KNOWN_EXTS = (*IMAGE_EXTS, CAPTION_EXT, META_EXT)
NO_IMAGE = "no image member"
NO_CAPTION = "no caption member"
TRUNCATED = "truncated tar"


@dataclass(frozen=True)
class Pair:
    key: str
    shard: str
    image: str  # the member's name in the shard
    caption: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Bad:
    key: str
    shard: str
    reason: str
    pair_lost: bool = True  # False: only the member is left out (an unknown extension), the pair may stand


def build_webdataset(root: Path, opts: WebDataset, out_dir: Path, seed: int) -> Collection:
    shards = list_shards(str(root))
    if not shards:
        raise DataError(f"no shard files (*.tar) in {root}; point data.root at img2dataset's output folder or a brace pattern of shards")
    rows = [row for shard in shards for row in read_shard(shard, opts.label_field)]
    pairs = [row for row in rows if isinstance(row, Pair)]
    label_names = opts.label_names or _sorted_labels({label for p in pairs for label in p.labels})
    index = {name: i for i, name in enumerate(label_names)}

    sink = ItemSink(labelled=opts.label_field is not None)
    shard_of: list[str] = []  # per item kept: its shard
    for row in rows:
        if isinstance(row, Bad):
            (sink.skip if row.pair_lost else sink.report)(row.key, row.reason, row.shard)
        elif unknown := [label for label in row.labels if label not in index]:
            sink.skip(row.key, f"unknown label {unknown[0]!r}", row.shard)
        else:
            kept = len(sink.items)
            sink.offer(row.key, member_ref(row.shard, row.image), row.caption, [index[label] for label in row.labels], source=row.shard)
            if len(sink.items) > kept:
                shard_of.append(row.shard)
    splits = carve_splits([item.id for item in sink.items], shard_of, shards, opts, seed)
    return sink.collection("webdataset", label_names, splits)


def read_shard(shard: str, label_field: str | None) -> Iterator[Pair | Bad]:
    """Every key of one shard as a Pair, or Bad with the reason. Only captions and metadata are read
    into memory; image members are only named. A shard that cannot be opened is a DataError."""
    reader = ShardReader(shard, read=lambda name: (found := member_key(name)) is not None and found[1] in (CAPTION_EXT, META_EXT))
    texts = {sample["__key__"]: sample for sample in reader.samples()}
    if reader.unopenable:
        raise DataError(f"cannot open shard {shard}: {reader.error()}")
    members: dict[str, dict[str, str]] = {}  # key -> extension -> member name, in the shard's order
    for name in reader.names:
        key, ext = member_key(name) or (name, "")
        members.setdefault(key, {})[ext] = name
    for key, exts in members.items():
        if key == reader.damaged_key:
            yield Bad(key, shard, TRUNCATED)
            continue
        for ext in exts:
            if ext not in KNOWN_EXTS:
                yield Bad(key, shard, f"unknown member extension {ext!r}", pair_lost=False)
        image = next((exts[ext] for ext in IMAGE_EXTS if ext in exts), None)
        sample = texts.get(key, {})
        if image is None:
            yield Bad(key, shard, NO_IMAGE)
        elif CAPTION_EXT not in sample:
            yield Bad(key, shard, NO_CAPTION)
        else:
            labels = _labels(sample.get(META_EXT), label_field)
            caption = sample[CAPTION_EXT].decode("utf-8", errors="replace")
            yield Bad(key, shard, labels) if isinstance(labels, str) else Pair(key, shard, image, caption, labels)


def _labels(meta: bytes | None, field: str | None) -> tuple[str, ...] | str:
    """The labels in `field` of a key's json member, or the reason they cannot be read."""
    if field is None or meta is None:
        return ()
    try:
        record = json.loads(meta)
    except ValueError:
        return f"{META_EXT} member is not JSON"
    if not isinstance(record, dict):
        return f"{META_EXT} member is not a JSON object"
    value = record.get(field)
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in values):
        return f"{field!r} is not a list of tags or a class id"
    return tuple(label for v in values if (label := str(v).strip()))


def _sorted_labels(labels: set[str]) -> list[str]:
    """Class ids in numeric order (2 before 10), tags alphabetically."""
    return sorted(labels, key=lambda label: (0, int(label), "") if label.isdigit() else (1, 0, label))


def key_position(key: str, seed: int, draw: str = "split") -> float:
    """Where a key falls in [0, 1): a hash of the key, the seed and `draw` alone, so no other key moves it."""
    digest = hashlib.blake2b(f"{draw}:{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def carve_splits(keys: list[str], shard_of: list[str], shards: list[str], opts: WebDataset, seed: int) -> dict[str, list[int]]:
    """Rows of each split (the module's docstring has the rule)."""
    names = {Path(shard).name for shard in shards}
    for knob in ("query_shards", "val_shards"):
        if absent := [name for name in getattr(opts, knob) if name not in names]:
            raise DataError(f"data.webdataset.{knob}: {absent[0]} is not among the shards of data.root")
    query_shards, val_shards = set(opts.query_shards), set(opts.val_shards)
    q, v = opts.query_fraction, opts.val_fraction
    splits: dict[str, list[int]] = {"query": [], "retrieval": [], "train": [], "val": []}
    for row, (key, shard) in enumerate(zip(keys, shard_of, strict=True)):
        name, at = Path(shard).name, key_position(key, seed)
        if name in query_shards if query_shards else at < q:
            splits["query"].append(row)
            continue
        splits["retrieval"].append(row)
        if name in val_shards if val_shards else q <= at < q + v:
            splits["val"].append(row)
        elif key_position(key, seed, "train") < opts.train_fraction:
            splits["train"].append(row)
    return splits
