"""NUS-WIDE from its original downloads, unpacked under `data.root`:

    ImageList/Imagelist.txt                 one image per line, Windows style: actor\\0001_2124494179.jpg
    NUS_WID_Tags/All_Tags.txt               one line per image: <Flickr id> <tag> <tag> ...
    Groundtruth/AllLabels/Labels_<c>.txt    one 0/1 per line for concept c (81 files)
    Flickr/<folder>/<file>.jpg              the images (Flickr.tar / the authors' image archive)

The three lists are aligned line by line. An image-list line maps to a file by its last two
backslash-separated parts, `actor\\0001_2124494179.jpg` -> Flickr/actor/0001_2124494179.jpg
(a full `C:\\ImageData\\Flickr\\actor\\...` path maps the same way).

Labels: the `top_concepts` most frequent concepts over the whole set (ties broken by name),
the field's "NUS-WIDE TC-10"; label order is alphabetical.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from cmhash.config.choices.datasets import Nuswide
from cmhash.data.datasets.common import (
    ItemSink,
    missing,
    read_lines,
    require_dir,
    require_file,
    require_root,
)
from cmhash.data.manifest import Collection
from cmhash.errors import ConfigError, DataError

IMAGE_LIST = "ImageList/Imagelist.txt"
TAG_FILE = "NUS_WID_Tags/All_Tags.txt"
LABEL_DIR = "Groundtruth/AllLabels"
IMAGE_DIR = "Flickr"
TAG_MISMATCH = "tag line is for another image"


def build_nuswide(root: Path, opts: Nuswide, out_dir: Path, seed: int) -> Collection:
    root = Path(root)
    require_root(root, "NUS-WIDE")
    image_list = read_lines(require_file(root / IMAGE_LIST, "NUS-WIDE image list"))
    tag_path = require_file(root / TAG_FILE, "NUS-WIDE tag file")
    tag_lines = read_lines(tag_path)
    label_dir = require_dir(root / LABEL_DIR, "NUS-WIDE label folder")
    image_dir = require_dir(root / IMAGE_DIR, "NUS-WIDE image folder")
    label_files = sorted(label_dir.glob("Labels_*.txt"))
    if not label_files:
        raise missing("NUS-WIDE label files", label_dir / "Labels_<concept>.txt")

    _check_aligned(tag_path, len(tag_lines), len(image_list))
    concepts = [p.stem.removeprefix("Labels_") for p in label_files]
    matrix = np.stack([_read_label_column(p, len(image_list)) for p in label_files], axis=1)
    keep = _top_concepts(concepts, matrix.sum(axis=0), opts.top_concepts)
    matrix = matrix[:, keep]

    sink = ItemSink()
    for row, (entry, tag_line) in enumerate(zip(image_list, tag_lines)):
        relative = PurePosixPath(*entry.strip().split("\\")[-2:])
        item_id = str(relative.with_suffix("")) if relative.name else f"line {row + 1}"
        flickr_id, _, tags = " ".join(tag_line.split()).partition(" ")  # "<id>   <tag> <tag>", or the id alone
        if flickr_id and not relative.stem.endswith(f"_{flickr_id}"):
            sink.skip(item_id, TAG_MISMATCH)
            continue
        sink.offer(item_id, image_dir / relative, tags, np.flatnonzero(matrix[row]).tolist())
    return sink.collection("nuswide", [concepts[j] for j in keep])


def _check_aligned(path: Path, lines: int, expected: int) -> None:
    if lines != expected:
        raise DataError(
            f"{path} has {lines} lines but {IMAGE_LIST} has {expected}; the files must align line by line "
            "(re-extract them from the original download)"
        )


def _read_label_column(path: Path, expected: int) -> np.ndarray:
    values = path.read_bytes().split()
    _check_aligned(path, len(values), expected)
    return np.array(values) == b"1"


def _top_concepts(concepts: list[str], counts: np.ndarray, k: int) -> list[int]:
    """Column indices of the k most frequent concepts, ties broken by name, returned in name order."""
    if k > len(concepts):
        raise ConfigError(f"data.nuswide.top_concepts is {k}, but {LABEL_DIR} has only {len(concepts)} concepts")
    by_frequency = sorted(range(len(concepts)), key=lambda j: (-counts[j], concepts[j]))
    return sorted(by_frequency[:k], key=concepts.__getitem__)
