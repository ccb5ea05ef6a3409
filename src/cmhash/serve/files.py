"""The files GET /api/items/{row}/image may send: the image of an indexed row and nothing else;
and how a URL names a row (row_number).

The path comes from the index's own item list, never from the request (which only names a row),
and is sent only if its real path, symlinks followed, lies under an indexed root: the folder given
to `cmhash index --images`, or else the folders that hold the listed images. So a link planted
among the images that points elsewhere (../../etc/passwd, ~/.ssh) is refused like a missing file.
Relative paths are read from the working directory, as `cmhash search` prints them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class IndexedImages:
    def __init__(self, items: list[dict[str, Any]], source: dict[str, str]) -> None:
        self.listed = [item.get("image") for item in items]
        folders = [source["images"]] if "images" in source else {os.path.dirname(p) or "." for p in self.listed if p}
        self.roots = [Path(os.path.realpath(folder)) for folder in folders]

    def path(self, row: str) -> Path | None:
        """The file to send for `row` (digits), or None: no such row, no image, or outside the roots."""
        number = row_number(row)
        if number is None or number >= len(self.listed) or not self.listed[number]:
            return None
        real = Path(os.path.realpath(self.listed[number]))
        if not real.is_file() or not any(real.is_relative_to(root) for root in self.roots):
            return None
        return real


def row_number(row: str) -> int | None:
    """A row named in a URL as a number (ASCII digits, at most 18 of them: past that, int() of a
    long enough string refuses to convert), or None."""
    return int(row) if row.isascii() and row.isdigit() and len(row) <= 18 else None
