"""The files GET /api/items/{row}/image may send: the image of an indexed row and nothing else
(a file, or a member of a webdataset tar shard: `shard.tar#member`); and how a URL names a row
(row_number).

The path comes from the index's own item list, never from the request (which only names a row),
and is sent only if its real path (a member's: its shard's), symlinks followed, lies under an indexed root: the folder given
to `cmhash index --images`, or else the folders that hold the listed images. So a link planted
among the images that points elsewhere (../../etc/passwd, ~/.ssh) is refused like a missing file.
Relative paths are read from the working directory, as `cmhash search` prints them.
"""

from __future__ import annotations

import functools
import os
import tarfile
from pathlib import Path
from typing import Any

from cmhash.data.tar_shards import split_member_ref


class IndexedImages:
    def __init__(self, items: list[dict[str, Any]], source: dict[str, str]) -> None:
        self.listed = [item.get("image") for item in items]
        folders = [source["images"]] if "images" in source else {os.path.dirname(p) or "." for p in self.listed if p}
        self.roots = [Path(os.path.realpath(folder)) for folder in folders]

    def path(self, row: str) -> Path | None:
        """The file to send for `row` (digits), or None: no such row, no image, or outside the roots."""
        listed = self._listed(row)
        return self._inside(listed) if listed else None

    def member(self, row: str) -> tuple[str, bytes] | None:
        """(member name, its bytes) for a `row` whose image is a member of a tar shard, or None."""
        ref = split_member_ref(self._listed(row) or "")
        shard = self._inside(ref[0]) if ref else None
        data = read_member(shard, ref[1]) if shard else None
        return None if data is None else (ref[1], data)

    def _listed(self, row: str) -> str | None:
        number = row_number(row)
        return self.listed[number] if number is not None and number < len(self.listed) else None

    def _inside(self, listed: str) -> Path | None:
        real = Path(os.path.realpath(listed))
        if not real.is_file() or not any(real.is_relative_to(root) for root in self.roots):
            return None
        return real


def row_number(row: str) -> int | None:
    """A row named in a URL as a number (ASCII digits, at most 18 of them: past that, int() of a
    long enough string refuses to convert), or None."""
    return int(row) if row.isascii() and row.isdigit() and len(row) <= 18 else None


def read_member(shard: Path, member: str) -> bytes | None:
    """One member's bytes, found through the shard's member table (read once per shard version and
    kept for the last few shards: a table lookup and one seek per call), or None when the shard
    cannot be read or has no such member."""
    try:
        stat = shard.stat()
        where = _member_table(str(shard), stat.st_mtime_ns, stat.st_size).get(member)
        if where is None:
            return None
        offset, size = where
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except (OSError, tarfile.TarError):
        return None
    return data if len(data) == size else None  # shorter: the shard was cut since its table was read


@functools.lru_cache(maxsize=8)
def _member_table(shard: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of a shard's regular files (webdataset reads shards only
    as streams); its mtime and size key the cache, so a rewritten shard is read again."""
    with tarfile.open(shard, "r:") as tar:  # uncompressed, as webdataset shards are
        return {info.name: (info.offset_data, info.size) for info in tar if info.isfile()}
