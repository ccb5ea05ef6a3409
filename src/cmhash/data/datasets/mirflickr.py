"""MIRFlickr-25K from its two original zips, unpacked side by side under `data.root`:

    mirflickr/im{N}.jpg                      N = 1..25000 (mirflickr25k.zip)
    mirflickr/meta/tags/tags{N}.txt          the image's cleaned Flickr tags, one per line
    mirflickr25k_annotations_v080/<c>.txt    1-based image numbers showing concept c
                                             (mirflickr25k_annotations_v080.zip)

Caption = the image's tags joined with spaces. Labels = the 24 plain concept lists; the
`<c>_r1.txt` lists (strict "relevant" subsets of 14 of them) and README.txt are not labels.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from cmhash.config.choices.datasets import Mirflickr
from cmhash.data.datasets.common import ItemSink, read_lines, require_dir, require_file, require_root
from cmhash.data.manifest import Collection
from cmhash.errors import DataError

CONCEPTS = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
    "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
    "tree", "water",
)  # fmt: skip

IMAGE_DIR = "mirflickr"
TAG_DIR = "mirflickr/meta/tags"
ANNOTATION_DIR = "mirflickr25k_annotations_v080"
_IMAGE_NAME = re.compile(r"im(\d+)\.jpg")


def build_mirflickr(root: Path, opts: Mirflickr, out_dir: Path, seed: int) -> Collection:
    root = Path(root)
    require_root(root, "MIRFlickr-25K")
    image_dir = require_dir(root / IMAGE_DIR, "MIRFlickr-25K image folder")
    tag_dir = require_dir(root / TAG_DIR, "MIRFlickr-25K tag folder")
    annotation_dir = require_dir(root / ANNOTATION_DIR, "MIRFlickr-25K annotation folder")

    concept_images = {
        c: _read_image_numbers(require_file(annotation_dir / f"{c}.txt", "MIRFlickr-25K annotation file"))
        for c in CONCEPTS
    }
    # Every image the download mentions: a missing file must show up as skipped, not vanish.
    numbers = {int(m[1]) for p in image_dir.iterdir() if (m := _IMAGE_NAME.fullmatch(p.name))}
    numbers.update(*concept_images.values())

    labels = {n: [] for n in numbers}
    for index, concept in enumerate(CONCEPTS):  # CONCEPTS is sorted, so index = label index
        for n in concept_images[concept]:
            labels[n].append(index)

    tags = {n: _read_tags(tag_dir / f"tags{n}.txt") for n in sorted(numbers)}
    frequency = Counter(tag for image_tags in tags.values() if image_tags for tag in set(image_tags))
    sink = ItemSink()
    for n in sorted(numbers):
        if tags[n] is None and labels[n]:
            sink.skip(str(n), "tags file missing")
            continue
        caption = " ".join(t for t in tags[n] or () if frequency[t] >= opts.min_tag_count)
        sink.offer(str(n), image_dir / f"im{n}.jpg", caption, labels[n])
    return sink.collection("mirflickr", list(CONCEPTS))


def _read_image_numbers(path: Path) -> set[int]:
    numbers = set()
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            numbers.add(int(line))
        except ValueError:
            raise DataError(f"{path}:{lineno}: expected an image number, got {line.strip()!r}") from None
    return numbers


def _read_tags(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [tag for line in read_lines(path) if (tag := line.strip())]
