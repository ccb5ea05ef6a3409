"""The manifest: one JSONL file per split, one image–caption pair per line.

Every dataset (the offline demo and each real importer) produces the same thing, a
`Collection`, and `prepare` writes it out in this form:

    stages/prepare/<split>.jsonl   {"id": "...", "image": "path", "caption": "...", "labels": [0, 5]}
    stages/prepare/labels.json     {"dataset": "...", "options": {...}, "seed": N, "labels": ["name0", ...]}

`image` is a path as the importer found it (absolute, or relative to the directory the
pipeline runs in); `labels` are indices into the label names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmhash.errors import DataError
from cmhash.io import atomic_write_text

SPLITS = ("train", "val", "query", "retrieval")


@dataclass(frozen=True)
class Item:
    id: str
    image: str
    caption: str
    labels: tuple[int, ...]


@dataclass
class Skipped:
    id: str
    reason: str
    source: str | None = None  # the file it was read from, where the id alone does not say (a tar shard)


@dataclass
class Collection:
    """What an importer returns: the usable items, the label names (none: an unlabelled collection),
    what it left out, and the splits (rows into `items`) when the importer carves them itself."""

    dataset: str
    items: list[Item]
    label_names: list[str]
    skipped: list[Skipped] = field(default_factory=list)
    splits: dict[str, list[int]] | None = None


def multi_hot(items: list[Item], num_labels: int) -> np.ndarray:
    """[N, C] uint8 multi-hot label matrix."""
    out = np.zeros((len(items), num_labels), dtype=np.uint8)
    for row, item in enumerate(items):
        out[row, list(item.labels)] = 1
    return out


def write_split(path: Path, items: list[Item]) -> None:
    lines = (json.dumps({"id": i.id, "image": i.image, "caption": i.caption, "labels": list(i.labels)}) for i in items)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_split(path: Path) -> list[Item]:
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (run `cmhash prepare` first)")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append(Item(str(row["id"]), str(row["image"]), str(row["caption"]), tuple(int(x) for x in row["labels"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: not a manifest line ({exc})") from None
    return items


def write_label_names(path: Path, dataset: str, names: list[str], **about) -> None:
    """`about`: what else identifies this version of the data (prepare adds the options and seed)."""
    atomic_write_text(path, json.dumps({"dataset": dataset, **about, "labels": names}, indent=2) + "\n")


def read_label_names(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"label names not found: {path} (run `cmhash prepare` first)")
    return list(json.loads(path.read_text(encoding="utf-8"))["labels"])


def make_splits(n: int, *, query: int, train: int, val: int, seed: int) -> dict[str, np.ndarray]:
    """The field's protocol, seeded: query and retrieval are disjoint; train and val are
    disjoint subsets of retrieval (val is carved from the training side, never from query)."""
    if query + train + val > n:
        raise DataError(f"split sizes query={query} + train={train} + val={val} exceed the {n} usable pairs")
    order = np.random.default_rng(seed).permutation(n)
    query_idx, retrieval_idx = order[:query], order[query:]
    return {
        "query": np.sort(query_idx),
        "retrieval": np.sort(retrieval_idx),
        "train": np.sort(retrieval_idx[:train]),
        "val": np.sort(retrieval_idx[train : train + val]),
    }
