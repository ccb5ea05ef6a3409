"""`cmhash extract` for precomputed features (`data.name: features`): no CLIP runs. The arrays prepare
checked (cmhash.data.precomputed) become the feature files, with the keys of extracted ones
plus where they came from (`source_format`, `source_files`: each file's SHA-256). The CLIP model
they are declared to come from (data.features.clip_model, pretrained) is checked - a known name,
weights a tag or a file, the same feature width - so that search can encode queries with it; when
unknown (null), search takes only indexed items as queries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cmhash.data import precomputed
from cmhash.data.manifest import SPLITS
from cmhash.digests import digest
from cmhash.errors import DataError
from cmhash.features.clip import clip_weights
from cmhash.io import all_or_nothing, atomic_write_text, save_pickle, write_json

log = logging.getLogger("cmhash")
KEYS = ("data.features.clip_model", "data.features.pretrained")


def clip_meta(model: str | None, pretrained: str | None, seed: int, width: int) -> dict[str, Any]:
    """What the feature files record about the CLIP model, as extract records it for its own."""
    if model is None:
        return {"clip_model": None, "pretrained": None, "random_init": False}
    _, meta, dim = clip_weights(model, pretrained, KEYS)
    if dim != width:
        raise DataError(f"the precomputed features are {width} wide but CLIP {model} makes {dim}-wide features ({KEYS[0]}); "
                        "name the model they were made with, or null")
    if meta["random_init"]:
        meta["seed"] = seed  # search draws the same random weights from it
    return meta


def source_note(meta: dict[str, Any]) -> str:
    if meta["clip_model"] is None:
        return f"precomputed features of an unknown CLIP model ({KEYS[0]}: null): search takes only indexed items as queries"
    return f"precomputed features of CLIP {meta['clip_model']} ({meta['pretrained']})"


def write_precomputed(seed: int, labels: dict[str, Any], prepare_dir: Path, out_dir: Path, metrics_path: Path) -> None:
    """`labels`: prepare's labels.json (cmhash.data.precomputed.prepared)."""
    splits = {split: precomputed.load(prepare_dir, split) for split in SPLITS}
    options, source = labels["options"], labels["precomputed"]
    meta = clip_meta(options["clip_model"], options["pretrained"], seed, splits["train"].image.shape[1])
    data = {"dataset": labels["dataset"], "dataset_version": digest(labels, precomputed.digests(prepare_dir))[:16],
            "dataset_options": options, "dataset_seed": labels["seed"], "label_names": list(labels["labels"]),
            "source_format": source["format"], "source_files": source["sources"], "val_split": source["val"]}
    with all_or_nothing():  # a failure part-way keeps the previous feature files, not a mix
        for split, arrays in splits.items():
            texts = {name: values for name, values in (("captions", arrays.captions), ("images", arrays.images)) if values is not None}
            save_pickle(out_dir / f"{split}.pkl", {"image": arrays.image, "text": arrays.text, "label": arrays.label,
                                                   "ids": arrays.ids, "split": split, **texts, **data, **meta})
        atomic_write_text(out_dir / "skipped.jsonl", "")  # no images: none undecodable
        write_json(metrics_path, {
            "clip_model": meta["clip_model"], "pretrained": meta["pretrained"], "random_init": meta["random_init"],
            "weights": source_note(meta), "dataset": data["dataset"], "dataset_version": data["dataset_version"],
            "items": {split: len(arrays.ids) for split, arrays in splits.items()}, "skipped_images": 0,
            "source_format": data["source_format"], "source_files": data["source_files"], "val_split": data["val_split"],
        })
    log.info("extract: precomputed features (%s), no CLIP run: %s", data["source_format"], source_note(meta))
