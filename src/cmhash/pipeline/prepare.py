"""Stage `prepare`: a dataset (the offline demo, or a real one from its download) as manifests.

reads   data.root in the dataset's original layout (nothing for the demo)
writes  stages/prepare/{train,val,query,retrieval}.jsonl, labels.json, skipped.jsonl
        (+ stages/prepare/images/ for the demo)
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from cmhash.config import choose, get, load_params
from cmhash.data.datasets import dataset_options, get_importer
from cmhash.data.datasets.common import NO_LABEL
from cmhash.data.manifest import make_splits, write_label_names, write_split
from cmhash.errors import DataError
from cmhash.io import atomic_write_text
from cmhash.pipeline import ParamsOption

log = logging.getLogger("cmhash")
BAD_ITEM_POLICIES = ("skip", "fail")


def run(params: dict, out_dir: Path) -> dict[str, int]:
    name = str(get(params, "data.name"))
    importer = get_importer(name)
    opts = dataset_options(name, get(params, f"data.{name}"))
    on_bad_item = choose(get(params, "data.on_bad_item"), BAD_ITEM_POLICIES, "data.on_bad_item")
    seed = int(get(params, "seed"))
    collection = importer(Path(str(get(params, "data.root"))), opts, out_dir, seed)
    # Pairs without a label are the field's protocol filter, not bad data: reported, never fatal.
    bad = [s for s in collection.skipped if s.reason != NO_LABEL]
    if bad and on_bad_item == "fail":
        raise DataError(f"{len(bad)} bad item(s), first: {bad[0].id}: {bad[0].reason} (or set data.on_bad_item: skip)")
    if not collection.items:
        raise DataError(f"dataset '{name}' has no usable pairs under {get(params, 'data.root')}")

    splits = make_splits(len(collection.items), query=int(opts["query"]), train=int(opts["train"]), val=int(opts["val"]), seed=seed)
    for split, rows in splits.items():
        write_split(out_dir / f"{split}.jsonl", [collection.items[r] for r in rows])
    write_label_names(out_dir / "labels.json", collection.dataset, collection.label_names, options=opts, seed=seed)
    atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps({"id": s.id, "reason": s.reason}) + "\n" for s in collection.skipped))
    counts = {split: len(rows) for split, rows in splits.items()}
    log.info("prepare %s: %s pairs, %d labels; splits %s", name, len(collection.items), len(collection.label_names), counts)
    if collection.skipped:
        reasons = Counter(s.reason for s in collection.skipped)
        log.warning("skipped %d item(s) (%s); see %s", len(collection.skipped),
                    ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()), out_dir / "skipped.jsonl")
    return counts


def command(
    params: ParamsOption = Path("params.yaml"),
    out_dir: Annotated[Path, typer.Option(help="where the manifests go.")] = Path("stages/prepare"),
) -> None:
    """Read a dataset (data.name; `demo` generates the offline one) into per-split manifests."""
    run(load_params(params), out_dir)
