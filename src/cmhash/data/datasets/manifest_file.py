"""Any other collection, described by one CSV or JSONL file (`path`, relative to `data.root`):

    CSV    header row with columns image, caption, labels[, id]; labels joined by `separator`
           image,caption,labels
           photos/001.jpg,a dog on a beach,dog|beach
    JSONL  one object per line with keys image, caption, labels (a list)[, id]
           {"image": "photos/001.jpg", "caption": "a dog on a beach", "labels": ["dog", "beach"]}

Relative image paths are relative to the manifest file's folder. `id` defaults to the record's
1-based row number. Label names are `label_names` when given, else the sorted set of labels seen.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cmhash.config.choices.datasets import Manifest
from cmhash.data.datasets.common import ItemSink, read_text, require_file, require_root
from cmhash.data.manifest import Collection
from cmhash.errors import ConfigError, DataError

REQUIRED = ("image", "caption", "labels")


@dataclass(frozen=True)
class Record:
    id: str
    image: str
    caption: str
    labels: tuple[str, ...]


# A reader yields, per record, either a Record or (id, reason) for a record it could not parse.
Reader = Callable[[Path, Manifest], Iterator["Record | tuple[str, str]"]]


def build_manifest(root: Path, opts: Manifest, out_dir: Path, seed: int) -> Collection:
    root = Path(root)
    if not Path(opts.path).is_absolute():  # an absolute path needs no root
        require_root(root, "the manifest's collection")
    path = root / opts.path
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"data.manifest.path must end in one of {', '.join(READERS)} (got {path.name!r})")
    given_names = opts.label_names
    rows = list(reader(require_file(path, "manifest file"), opts))
    label_names = given_names or sorted({label for r in rows if isinstance(r, Record) for label in r.labels})
    index = {name: i for i, name in enumerate(label_names)}

    sink = ItemSink()
    for row in rows:
        if not isinstance(row, Record):
            sink.skip(*row)
        elif unknown := [label for label in row.labels if label not in index]:
            sink.skip(row.id, f"unknown label {unknown[0]!r}")
        else:
            sink.offer(row.id, path.parent / row.image, row.caption, [index[label] for label in row.labels])
    return sink.collection("manifest", label_names)


def _labels(names: object) -> tuple[str, ...]:
    return tuple(label for n in names if (label := str(n).strip()))


def _text(path: Path) -> str:
    return read_text(path).removeprefix("\ufeff")  # spreadsheet programs write a BOM


def _read_csv(path: Path, opts: Manifest) -> Iterator[Record | tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)}; its header row must name image, caption, labels")
    try:
        for number, row in enumerate(reader, 1):
            cell = {key: (value or "") for key, value in row.items() if key is not None}
            yield Record(
                cell.get("id", "").strip() or str(number),
                cell["image"].strip(),
                cell["caption"],
                _labels(cell["labels"].split(opts.separator)),
            )
    except csv.Error as exc:  # broken quoting derails every row after it: a file-level error
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None


def _read_jsonl(path: Path, opts: Manifest) -> Iterator[Record | tuple[str, str]]:
    lines = (line for line in _text(path).split("\n") if line.strip())
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            yield str(number), "not a JSON object"
            continue
        if not isinstance(row, dict):
            yield str(number), "not a JSON object"
            continue
        item_id = str(number) if row.get("id") in (None, "") else str(row["id"])
        if absent := [key for key in REQUIRED if key not in row]:
            yield item_id, f"missing key {absent[0]!r}"
        elif not isinstance(row["labels"], list):
            yield item_id, "labels is not a list"
        else:
            yield Record(item_id, str(row["image"] or ""), str(row["caption"] or ""), _labels(row["labels"]))


READERS: dict[str, Reader] = {".csv": _read_csv, ".jsonl": _read_jsonl}
