"""The manifest: one JSONL file per split, one image–caption pair per line.

Every dataset (the offline demo and each real importer) produces the same thing, a
`Collection`, and `prepare` writes it out in this form:

    stages/prepare/<split>.jsonl   {"id": "...", "image": "path", "caption": "...", "labels": [0, 5]}
                                   (+ "group": "..." where an image has several captions, one line each)
    stages/prepare/labels.json     {"dataset": "...", "options": {...}, "seed": N, "labels": ["name0", ...]}

`image` is a path as the importer found it (absolute, or relative to the directory the
pipeline runs in); `labels` are indices into the label names. `group` names the image a caption
belongs to when an image has several (COCO's five): the lines of one group share the image, land in
one split, and count as one image for Recall@K. Without it every pair is its own image.
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
    group: str | None = None  # the image this caption belongs to, where an image has several captions


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
    lines = (json.dumps({"id": i.id, "image": i.image, "caption": i.caption, "labels": list(i.labels),
                         **({"group": i.group} if i.group is not None else {})}) for i in items)
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
                group = None if row.get("group") is None else str(row["group"])
                items.append(Item(str(row["id"]), str(row["image"]), str(row["caption"]), tuple(int(x) for x in row["labels"]), group))
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


def make_group_splits(items: list[Item], *, query: int, train: int, val: int, seed: int) -> dict[str, np.ndarray]:
    """make_splits over images rather than pairs: the sizes count images, and every caption of an
    image goes where its image goes (no image in both query and retrieval). Items without a group
    are each their own image, which gives make_splits' splits exactly."""
    groups: dict[str, int] = {}
    of_item = np.array([groups.setdefault(item.id if item.group is None else item.group, len(groups)) for item in items])
    if len(groups) == len(items):
        return make_splits(len(items), query=query, train=train, val=val, seed=seed)
    per_image = make_splits(len(groups), query=query, train=train, val=val, seed=seed)
    return {split: np.flatnonzero(np.isin(of_item, rows)) for split, rows in per_image.items()}
