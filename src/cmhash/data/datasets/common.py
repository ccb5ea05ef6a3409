"""What every dataset importer shares: required-path checks with one-line errors, and the
per-item checks that turn a bad pair into a `Skipped` entry. An importer is
`build_X(root, opts, out_dir, seed) -> Collection`: `root` is `data.root`, `opts` its
`data.<name>` section (cmhash.config.choices.datasets), `out_dir` the prepare stage's folder (only the
demo writes there)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cmhash.data.captions import clean_caption
from cmhash.data.manifest import Collection, Item, Skipped
from cmhash.errors import DataError

# Reasons an item is left out. Stable strings: the skipped report and tests use them.
DUPLICATE_ID = "duplicate id"
NO_LABEL = "no label"
EMPTY_CAPTION = "empty caption"
IMAGE_MISSING = "image file missing"


class LayoutError(DataError):
    """A file or folder of the expected download layout is missing under an existing root."""


def require_root(root: Path, dataset: str) -> None:
    if not root.is_dir():
        raise DataError(
            f"dataset root not found: {root} (download {dataset} there, or point data.root at the folder that holds it)"
        )


def missing(what: str, path: Path | str) -> LayoutError:
    return LayoutError(f"{what} not found: {path} (the expected layouts: docs/data.md, Real datasets)")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise missing(what, path)
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise missing(what, path)
    return path


def read_text(path: Path) -> str:
    # Flickr tags carry the odd byte that is not UTF-8; a replacement character beats a crash.
    return path.read_bytes().decode("utf-8", errors="replace")


def read_lines(path: Path) -> list[str]:
    """The file's lines. Only \\n ends a line: `str.splitlines` would also split on the
    Unicode separators a Flickr tag may hold and shift line-aligned files out of step."""
    lines = read_text(path).split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


class ItemSink:
    """Collects items, applying the checks every dataset shares in a fixed order, so the
    reason recorded for a bad item does not depend on the importer."""

    def __init__(self, labelled: bool = True) -> None:
        self.items: list[Item] = []
        self.skipped: list[Skipped] = []
        self._seen: set[str] = set()
        self._labelled = labelled  # False: a collection without labels, whose pairs need none

    def skip(self, item_id: str, reason: str, source: str | None = None) -> None:
        self._seen.add(item_id)
        self.skipped.append(Skipped(item_id, reason, source))

    def report(self, item_id: str, reason: str, source: str | None = None) -> None:
        """A bad part of an item that was left out without the item (it may still be offered)."""
        self.skipped.append(Skipped(item_id, reason, source))

    def offer(self, item_id: str, image: Path | str, caption: str, labels: Iterable[int], group: str | None = None,
              source: str | None = None) -> None:
        """`image`: a file, or (with `source`, the shard it is in) a member the importer found there.
        `group`: the image's id where it has several captions (one offer per caption)."""
        labels = tuple(sorted(set(labels)))
        caption = clean_caption(caption)
        if item_id in self._seen:
            reason = DUPLICATE_ID
        elif self._labelled and not labels:
            reason = NO_LABEL
        elif not caption:
            reason = EMPTY_CAPTION
        elif source is None and not Path(image).is_file():  # existence only: decoding is the extract stage's job
            reason = IMAGE_MISSING
        else:
            self._seen.add(item_id)
            self.items.append(Item(item_id, str(image), caption, labels, group))
            return
        self.skip(item_id, reason, source)

    def collection(self, dataset: str, label_names: list[str], splits: dict[str, list[int]] | None = None) -> Collection:
        return Collection(dataset, self.items, label_names, self.skipped, splits)
