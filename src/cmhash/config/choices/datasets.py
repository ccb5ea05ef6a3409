"""Datasets (params.yaml `data.name`), each with its options in `data.<name>`: the split sizes
every dataset of images and captions has, plus its own. `marker` is a path (relative to
`data.root`) that only that dataset's download layout has; it lets a layout error say which
dataset a root does look like. `precomputed` marks a dataset of feature files (`features`): its
splits come from the files, and prepare hands extract arrays instead of manifests. `own_splits` marks a dataset that carves its splits itself
(`webdataset`: by shard or by a hash of the key, so they stay put when shards are added) instead of
taking split sizes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StrictInt, model_validator

from cmhash.config.fields import Count, Fraction, Section
from cmhash.config.registry import Registry

DATASETS = Registry("dataset")
DEMO_MAX_OBJECTS = 4  # more shapes side by side would shrink below recognition at small image sizes


def _distinct(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise ValueError("must be null or a list of distinct strings")
    return names


LabelNames = Annotated[list[str], AfterValidator(_distinct)] | None


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
    """MS-COCO 2014: 80 object categories, ~5 captions per image (all kept, or one)."""

    query: Count = 5000
    train: Count = 10000
    val: Count = 1000
    # all: every caption, one pair each, grouped by image (sizes count images); first (lowest annotation id) | random: one
    caption: Literal["all", "first", "random"] = "all"


@DATASETS.register("manifest", "cmhash.data.datasets.manifest_file:build_manifest")
class Manifest(Splits):
    """Any collection described by one CSV or JSONL file."""

    query: Count = 1000
    train: Count = 5000
    val: Count = 500
    path: str = "manifest.jsonl"  # relative to data.root (or absolute)
    separator: str = "|"  # between the labels of a CSV cell
    label_names: LabelNames = None  # the label vocabulary, in order; None: the sorted labels seen


@DATASETS.register("webdataset", "cmhash.data.datasets.webdataset_shards:build_webdataset", own_splits=True)
class WebDataset(Section):
    """Webdataset tar shards as img2dataset writes them (<key>.jpg, <key>.txt, <key>.json)."""

    query_shards: list[str] = []  # shard file names (as in data.root) whose pairs are the query set; []: carved by key hash
    val_shards: list[str] = []  # shard file names whose pairs are val; []: carved by key hash from the pairs not in query
    query_fraction: Fraction = 0.1  # without query_shards: the share of keys in query
    val_fraction: Fraction = 0.05  # without val_shards: the share of keys in val (a part of retrieval)
    train_fraction: Fraction = 1.0  # the share of the other pairs (not query, not val) that train takes, by key hash
    label_field: str | None = None  # the <key>.json field holding the labels (a list of tags, or a class id); None: unlabelled
    label_names: LabelNames = None  # the label vocabulary, in order; None: the sorted labels seen

    @model_validator(mode="after")
    def _splits(self) -> WebDataset:
        if self.query_fraction + self.val_fraction > 1:
            raise ValueError("query_fraction + val_fraction must be at most 1")
        if shared := sorted(set(self.query_shards) & set(self.val_shards)):
            raise ValueError(f"shard {shared[0]!r} is in both query_shards and val_shards")
        return self


class ArrayNames(Section):
    """Where one split's arrays are in a file that holds every split."""

    image: str
    text: str
    label: str


class SplitNames(Section):
    """Array names per split, defaults as most cross-modal hashing repositories ship one .mat file."""

    train: ArrayNames = ArrayNames(image="I_tr", text="T_tr", label="L_tr")
    val: ArrayNames = ArrayNames(image="I_va", text="T_va", label="L_va")
    query: ArrayNames = ArrayNames(image="I_te", text="T_te", label="L_te")
    retrieval: ArrayNames = ArrayNames(image="I_db", text="T_db", label="L_db")


@DATASETS.register("features", "cmhash.data.datasets.precomputed:build_precomputed", precomputed=True)
class Precomputed(Section):
    """Precomputed CLIP features (.pkl, .npz or .mat files, or clip-retrieval's embeddings), no images."""

    # auto: from the files' extensions; clip_retrieval: `clip inference` output (img_emb/, text_emb/, metadata/), no labels
    format: Literal["auto", "pickle", "npz", "mat", "clip_retrieval"] = "auto"
    file: str | None = None  # one file holding every split, relative to data.root; None: <split>.<ext> files, else the only one
    names: SplitNames = SplitNames()  # array names per split in a one-file layout (per-split files may use image/text/label)
    val: Count = 500  # when the files have no val split: pairs carved (seeded, disjoint) out of train
    query: Count = 1000  # format clip_retrieval (one collection, no splits): query pairs carved out (seeded), the rest retrieval
    train: Count = 5000  # format clip_retrieval: train pairs carved out of retrieval (and val beside them)
    label_names: LabelNames = None  # the label columns' names, in order; None: label0, label1, ...
    clip_model: str | None = None  # the open_clip model the features come from (e.g. ViT-B-32); None: unknown
    pretrained: str | None = None  # its open_clip tag or checkpoint file (e.g. openai); set with clip_model
