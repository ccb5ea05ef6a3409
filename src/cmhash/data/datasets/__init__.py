"""The dataset registry: `data.name` in params.yaml -> the importer that builds its `Collection`.

Every importer has the signature `build_X(root, opts, out_dir, seed) -> Collection`:
`root` is `data.root`, `opts` the `data.<name>` section (dataset options plus the split sizes
`query`, `train`, `val`), `out_dir` the prepare stage's folder (only the demo writes there).
Importers load their module on first use, so one broken or absent module cannot break the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cmhash.data.datasets.common import LayoutError, with_defaults
from cmhash.data.manifest import Collection
from cmhash.errors import ConfigError, DataError


class Importer(Protocol):
    def __call__(self, root: Path, opts: dict, out_dir: Path, seed: int) -> Collection: ...


@dataclass(frozen=True)
class LazyImporter:
    """`module.function`, imported when first called. `marker` is a path (relative to the
    root) that only this dataset's download layout has; it lets a layout error say which
    dataset the root does look like."""

    module: str
    function: str
    marker: str | None = None

    def load(self) -> Importer:
        return getattr(importlib.import_module(self.module), self.function)

    def defaults(self) -> dict[str, Any] | None:
        """The module's `DEFAULTS` (every option it accepts), or None if it declares none."""
        return getattr(importlib.import_module(self.module), "DEFAULTS", None)

    def __call__(self, root: Path, opts: dict, out_dir: Path, seed: int) -> Collection:
        root = Path(root)
        try:
            return self.load()(root, opts, out_dir, seed)
        except LayoutError as exc:
            raise DataError(f"{exc}{_layout_hint(root, exclude=self)}") from None


_PACKAGE = __name__

DATASETS: dict[str, LazyImporter] = {
    "coco": LazyImporter(f"{_PACKAGE}.coco", "build_coco", marker="annotations/captions_train2014.json"),
    "demo": LazyImporter(f"{_PACKAGE}.demo", "build_demo"),
    "manifest": LazyImporter(f"{_PACKAGE}.manifest_file", "build_manifest"),
    "mirflickr": LazyImporter(f"{_PACKAGE}.mirflickr", "build_mirflickr", marker="mirflickr25k_annotations_v080"),
    "nuswide": LazyImporter(f"{_PACKAGE}.nuswide", "build_nuswide", marker="ImageList/Imagelist.txt"),
}


def get_importer(name: str) -> Importer:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}") from None


def dataset_options(name: str, opts: dict | None) -> dict[str, Any]:
    """The `data.<name>` section completed with the importer's defaults (split sizes included)."""
    get_importer(name)
    defaults = DATASETS[name].defaults()
    return dict(opts or {}) if defaults is None else with_defaults(name, defaults, opts)


def detect_layouts(root: Path) -> list[str]:
    """Names of the datasets whose download layout `root` holds."""
    return [name for name, entry in sorted(DATASETS.items()) if entry.marker and (Path(root) / entry.marker).exists()]


def _layout_hint(root: Path, exclude: LazyImporter) -> str:
    found = [name for name in detect_layouts(root) if DATASETS[name] is not exclude]
    if not found:
        return ""
    return f"; {root} looks like the {' / '.join(found)} layout (set data.name: {found[0]})"
