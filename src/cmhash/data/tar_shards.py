"""Webdataset tar shards (img2dataset's output), read as streams with the `webdataset` library: which
shard files `data.root` names, one shard's samples together with the errors met reading it, and how
a manifest points at an image inside a shard (`<shard>#<member>`, e.g. `shards/00000.tar#000000012.jpg`).
Nothing is unpacked to disk; a reader holds one sample's bytes at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tarfile_samples

MEMBER_SEP = "#"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes (its encode_format)
CAPTION_EXT, META_EXT = "txt", "json"


def member_ref(shard: str, member: str) -> str:
    return f"{shard}{MEMBER_SEP}{member}"


def split_member_ref(image: str) -> tuple[str, str] | None:
    """(shard, member) when `image` points into a tar shard, else None (an image file)."""
    shard, sep, member = image.rpartition(MEMBER_SEP)
    return (shard, member) if sep and shard.endswith(".tar") and "/" not in member else None


def member_key(name: str) -> tuple[str, str] | None:
    """A member's (key, extension) as webdataset groups them: `000012.jpg` -> ('000012', 'jpg')."""
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext.lower())


def list_shards(root: str) -> list[str]:
    """`data.root` as shard files: a folder (its *.tar, sorted by name), or one file, a brace
    pattern (`shards/{00000..00009}.tar`) or several of either joined by `::`, as webdataset takes them."""
    if Path(root).is_dir():
        return [str(path) for path in sorted(Path(root).glob("*.tar"))]
    return list(expand_urls(root))


class ShardReader:
    """One shard's samples as a stream (dicts of `__key__` and extension -> bytes, as webdataset
    groups them). `read(name)` says which members' bytes to read; every member's name is listed in
    `names` either way. Errors do not stop the stream: they end it and land in `errors`, so a
    truncated shard still yields the samples before the damage."""

    def __init__(self, path: str, read: Callable[[str], bool]) -> None:
        self.path, self._read = path, read
        self.names: list[str] = []
        self.errors: list[Exception] = []

    def _select(self, name: str) -> bool:
        self.names.append(name)
        return self._read(name)

    def _handle(self, exc: Exception) -> bool:
        self.errors.append(exc)
        return True  # go on: the rest of this shard's stream, if any, ends at the damage

    def samples(self) -> Iterator[dict]:
        yield from tarfile_samples([{"url": self.path}], handler=self._handle, select_files=self._select)

    @property
    def unopenable(self) -> bool:
        """Nothing could be read at all: a missing file, or not a tar."""
        return bool(self.errors) and not self.names

    @property
    def damaged_key(self) -> str | None:
        """The key being read when the stream broke (a truncated tar): its members may be incomplete."""
        if not self.errors or not self.names:
            return None
        found = member_key(self.names[-1])
        return found[0] if found else None

    def error(self) -> str:
        exc = self.errors[0]
        return f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}"
