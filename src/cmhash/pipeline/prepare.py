"""Stage `prepare`: a dataset (the offline demo, or a real one from its download) as manifests.

reads   data.root in the dataset's original layout (nothing for the demo)
writes  stages/prepare/{train,val,query,retrieval}.jsonl, labels.json, skipped.jsonl
        (data.name: webdataset: the manifests point into the shards, `<shard>#<member>`; nothing unpacked)
        (+ stages/prepare/images/ for the demo)
        data.name: features (precomputed features, no images): stages/prepare/features/<split>.npz
        and labels.json instead (cmhash.data.precomputed)
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from cmhash.config.choices.datasets import DATASETS
from cmhash.config.options import ParamsOption
from cmhash.config.schema import Data, Params, load_params
from cmhash.config.stages import PrepareSettings
from cmhash.errors import DataError

log = logging.getLogger("cmhash")


def reads(p: Params) -> dict[str, Any]:
    """The params.yaml keys this stage reads (dvc.yaml lists exactly these)."""
    return PrepareSettings.of(p).reads()


def run(settings: PrepareSettings, out_dir: Path) -> dict[str, int]:
    seed, data = settings.seed, settings.data
    if DATASETS.entry(data.name).meta.get("precomputed"):
        return prepare_precomputed(seed, data, out_dir)
    from cmhash.data.datasets import build_collection
    from cmhash.data.datasets.common import NO_LABEL
    from cmhash.data.manifest import make_group_splits, write_label_names, write_split
    from cmhash.io import all_or_nothing, atomic_write_text

    name, opts = data.name, data.options
    collection = build_collection(name, Path(data.root), opts, out_dir, seed)
    # Pairs without a label are the field's protocol filter, not bad data: reported, never fatal.
    bad = [s for s in collection.skipped if s.reason != NO_LABEL]
    if bad and data.on_bad_item == "fail":
        where = f" in {bad[0].source}" if bad[0].source else ""
        raise DataError(f"{len(bad)} bad item(s), first: {bad[0].id}{where}: {bad[0].reason} (or set data.on_bad_item: skip)")
    if not collection.items:
        raise DataError(f"dataset '{name}' has no usable pairs under {data.root}")

    if collection.splits is not None:  # carved by the importer
        splits = collection.splits
        if empty := [split for split in ("query", "train", "val") if not splits[split]]:
            raise DataError(f"the {empty[0]} split of the {len(collection.items)} usable pairs is empty; give it more (data.{name})")
    else:
        sizes = {"query": opts.query, "train": opts.train, "val": opts.val}
        images = len({item.id if item.group is None else item.group for item in collection.items})
        if sum(sizes.values()) > images:
            given = " + ".join(f"data.{name}.{split} {size}" for split, size in sizes.items())
            what = "usable pairs" if images == len(collection.items) else f"images (with {len(collection.items)} captions)"
            raise DataError(f"split sizes {given} exceed the {images} {what}; make them smaller")
        splits = make_group_splits(collection.items, **sizes, seed=seed)  # several captions of an image: split by image
    with all_or_nothing():  # a failure part-way keeps the previous manifests, not a mix
        for split, rows in splits.items():
            write_split(out_dir / f"{split}.jsonl", [collection.items[r] for r in rows])
        write_label_names(out_dir / "labels.json", collection.dataset, collection.label_names, options=opts.model_dump(), seed=seed)
        atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps(skipped_row(s)) + "\n" for s in collection.skipped))
    counts = {split: len(rows) for split, rows in splits.items()}
    log.info("prepare %s: %s pairs, %d labels; splits %s", name, len(collection.items), len(collection.label_names), counts)
    if collection.skipped:
        reasons = Counter(s.reason for s in collection.skipped)
        log.warning("skipped %d item(s) (%s); see %s", len(collection.skipped),
                    ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()), out_dir / "skipped.jsonl")
    return counts


def skipped_row(skipped) -> dict[str, str]:
    row = {"id": skipped.id, "reason": skipped.reason}
    return {**row, "source": skipped.source} if skipped.source else row


def prepare_precomputed(seed: int, data: Data, out_dir: Path) -> dict[str, int]:
    """Feature files checked and normalised into arrays for extract; no manifests, nothing skipped."""
    from cmhash.data import precomputed
    from cmhash.data.datasets import build_collection
    from cmhash.io import all_or_nothing

    features = build_collection(data.name, Path(data.root), data.options, out_dir, seed)
    with all_or_nothing():  # a failure part-way keeps the previous arrays, not a mix
        precomputed.save(out_dir, features, options=data.options.model_dump(), seed=seed)
    counts = {split: len(arrays.ids) for split, arrays in features.splits.items()}
    log.info("prepare features: %s files from %s, %d labels, val %s; splits %s", features.format, data.root,
             len(features.label_names), features.val, counts)
    return counts


def command(
    params: ParamsOption = Path("params.yaml"),
    out_dir: Annotated[Path, typer.Option(help="where the manifests go.")] = Path("stages/prepare"),
) -> None:
    """Read a dataset (data.name; `demo` generates the offline one) into per-split manifests."""
    run(PrepareSettings.of(load_params(params)), out_dir)
