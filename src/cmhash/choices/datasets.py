"""Datasets (params.yaml `data.name`), each with its options in `data.<name>`: the split sizes
every dataset has, plus its own. `marker` is a path (relative to `data.root`) that only that
dataset's download layout has; it lets a layout error say which dataset a root does look like."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictInt, field_validator

from cmhash.registry import Registry
from cmhash.sections import Count, Fraction, Section

DATASETS = Registry("dataset")
DEMO_MAX_OBJECTS = 4  # more shapes side by side would shrink below recognition at small image sizes


class Splits(Section):
    """Split sizes in pairs. The retrieval set is every pair left after the query split; train
    and val are drawn from it."""

    query: Count
    train: Count
    val: Count


@DATASETS.register("demo", "cmhash.data.datasets.demo:build_demo")
class Demo(Splits):
    """The offline demo: coloured shapes with captions (no download)."""

    n_items: Count = 3000
    image_size: Annotated[StrictInt, Field(ge=16)] = 64  # pixels per side
    max_objects: Annotated[StrictInt, Field(ge=1, le=DEMO_MAX_OBJECTS)] = 2  # shapes per image: 1..max_objects
    usual_colour_rate: Fraction = 0.7  # how often a shape has its kind's usual colour
    query: Count = 500
    train: Count = 1500
    val: Count = 300


@DATASETS.register("mirflickr", "cmhash.data.datasets.mirflickr:build_mirflickr", marker="mirflickr25k_annotations_v080")
class Mirflickr(Splits):
    """MIRFlickr-25K: 24 concepts, captions from the Flickr tags."""

    query: Count = 2000
    train: Count = 5000
    val: Count = 1000
    min_tag_count: Count = 1  # a tag enters captions only if at least this many images carry it


@DATASETS.register("nuswide", "cmhash.data.datasets.nuswide:build_nuswide", marker="ImageList/Imagelist.txt")
class Nuswide(Splits):
    """NUS-WIDE: the most frequent concepts, captions from the tags."""

    query: Count = 2100
    train: Count = 10500
    val: Count = 1000
    top_concepts: Count = 10  # keep the most frequent concepts (the field's NUS-WIDE-10)


@DATASETS.register("coco", "cmhash.data.datasets.coco:build_coco", marker="annotations/captions_train2014.json")
class Coco(Splits):
    """MS-COCO 2014: 80 object categories, one caption per image."""

    query: Count = 5000
    train: Count = 10000
    val: Count = 1000
    caption: Literal["first", "random"] = "first"  # which caption: lowest annotation id, or seeded random


@DATASETS.register("manifest", "cmhash.data.datasets.manifest_file:build_manifest")
class Manifest(Splits):
    """Any collection described by one CSV or JSONL file."""

    query: Count = 1000
    train: Count = 5000
    val: Count = 500
    path: str = "manifest.jsonl"  # relative to data.root (or absolute)
    separator: str = "|"  # between the labels of a CSV cell
    label_names: list[str] | None = None  # the label vocabulary, in order; None: the sorted labels seen

    @field_validator("label_names")
    @classmethod
    def _distinct(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and len(set(names)) != len(names):
            raise ValueError("must be null or a list of distinct strings")
        return names
