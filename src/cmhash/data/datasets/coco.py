"""MS-COCO 2014 from its original downloads, unpacked under `data.root`:

    annotations/captions_{train,val}2014.json     images, and ~5 captions per image
    annotations/instances_{train,val}2014.json    object instances with their category id
    train2014/COCO_train2014_<12-digit id>.jpg    (file names as the json's images[].file_name)
    val2014/COCO_val2014_<12-digit id>.jpg

Labels: the 80 categories in category-id order (names from the json); an image's labels are
the categories of its instances. Captions: `all` (the default) keeps every caption, one pair
each (id `<image id>/<annotation id>`, grouped by the image: splits keep an image's captions
together and Recall@K counts an image query a hit if any of them is in the top K); `first`
(lowest annotation id) or `random` (seeded) keep one. Read with the standard json module (no
pycocotools).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cmhash.config.choices.datasets import Coco
from cmhash.data.captions import clean_caption
from cmhash.data.datasets.common import (
    ItemSink,
    require_dir,
    require_file,
    require_root,
)
from cmhash.data.manifest import Collection
from cmhash.errors import DataError

PARTS = ("train2014", "val2014")


def build_coco(root: Path, opts: Coco, out_dir: Path, seed: int) -> Collection:
    caption_choice = opts.caption
    root = Path(root)
    require_root(root, "MS-COCO 2014")
    for part in PARTS:  # every path up front: a missing one fails before minutes of json parsing
        require_file(root / "annotations" / f"captions_{part}.json", "COCO caption file")
        require_file(root / "annotations" / f"instances_{part}.json", "COCO instance file")
        require_dir(root / part, "COCO image folder")

    category_names: dict[int, str] = {}
    images: dict[int, Path] = {}
    categories: defaultdict[int, set[int]] = defaultdict(set)
    captions: defaultdict[int, list[tuple[int, str]]] = defaultdict(list)
    for part in PARTS:
        with _fields_of(path := root / "annotations" / f"instances_{part}.json"):
            instances = _load(path)
            category_names.update((c["id"], c["name"]) for c in instances["categories"])
            images.update((im["id"], root / part / im["file_name"]) for im in instances["images"])
            for a in instances["annotations"]:
                categories[a["image_id"]].add(a["category_id"])
            del instances  # train's parsed polygons take GBs; free them before the next file
        with _fields_of(path := root / "annotations" / f"captions_{part}.json"):
            for a in _load(path)["annotations"]:
                if isinstance(a["caption"], str) and (text := clean_caption(a["caption"])):
                    captions[a["image_id"]].append((a["id"], text))

    category_ids = sorted(category_names)
    label_of = {cid: index for index, cid in enumerate(category_ids)}
    rng = np.random.default_rng(seed)
    sink = ItemSink()
    for image_id in sorted(images):
        labels = [label_of[c] for c in categories[image_id] if c in label_of]
        if caption_choice == "all" and captions[image_id]:  # one pair per caption, grouped by the image
            for annotation_id, text in sorted(captions[image_id]):
                sink.offer(f"{image_id}/{annotation_id}", images[image_id], text, labels, group=str(image_id))
        else:
            sink.offer(str(image_id), images[image_id], _pick_caption(sorted(captions[image_id]), caption_choice, rng), labels)
    return sink.collection("coco", [category_names[c] for c in category_ids])


def _pick_caption(captions: list[tuple[int, str]], how: str, rng: np.random.Generator) -> str:
    """`captions` sorted by annotation id; "" when the image has none (reported as empty)."""
    if not captions:
        return ""
    return captions[0 if how == "first" else int(rng.integers(len(captions)))][1]


def _load(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-download it") from None


@contextmanager
def _fields_of(path: Path) -> Iterator[None]:
    """Turn a missing or mistyped field into one line naming the file, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is not a COCO 2014 annotation file (bad or missing field: {exc})") from None
