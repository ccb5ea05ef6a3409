"""Dataset importers: `data.name` in params.yaml -> the importer that builds its `Collection` (or,
for precomputed features, its `FeatureSet`), with its options in `data.<name>` (both registered in
cmhash.config.choices.datasets)."""

from __future__ import annotations

from pathlib import Path

from cmhash.config.choices.datasets import DATASETS
from cmhash.config.fields import Section
from cmhash.data.datasets import coco, demo, manifest_file, mirflickr, nuswide, precomputed, webdataset_shards  # noqa: F401  (the importers DATASETS names)
from cmhash.data.datasets.common import LayoutError
from cmhash.data.manifest import Collection
from cmhash.data.precomputed import FeatureSet
from cmhash.errors import DataError


def build_collection(name: str, root: Path, opts: Section, out_dir: Path, seed: int) -> Collection | FeatureSet:
    """Run the importer `name`; a missing piece of its download layout says which dataset the
    root does look like, if any."""
    root = Path(root)
    try:
        return DATASETS[name](root, opts, out_dir, seed)
    except LayoutError as exc:
        raise DataError(f"{exc}{_layout_hint(root, exclude=name)}") from None


def detect_layouts(root: Path) -> list[str]:
    """Names of the datasets whose download layout `root` holds."""
    return [e.name for e in DATASETS.entries() if e.meta.get("marker") and (Path(root) / e.meta["marker"]).exists()]


def _layout_hint(root: Path, exclude: str) -> str:
    found = [name for name in detect_layouts(root) if name != exclude]
    if not found:
        return ""
    return f"; {root} looks like the {' / '.join(found)} layout (set data.name: {found[0]})"
