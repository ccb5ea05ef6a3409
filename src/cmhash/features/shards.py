"""A work folder of finished shards, so a long job that is interrupted redoes only what it had not
finished. Each shard is a file named by a digest of everything its contents depend on, so a
shard made with other settings or other inputs is never reused, only left unread.

DVC deletes a stage's declared outputs before it re-runs the stage: the work folder must not be
one of them (extract keeps its shards in stages/extract_shards/, next to stages/extract/).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from cmhash.errors import DataError
from cmhash.io import load_pickle, save_pickle

log = logging.getLogger("cmhash")


class ShardStore:
    """Shards as restricted pickles (arrays and plain containers only): `<folder>/<key>.pkl`."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pkl"

    def load(self, key: str) -> dict[str, Any] | None:
        """The shard saved under `key`, or None if there is none (or it cannot be read)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            shard = load_pickle(path)
        except DataError as exc:  # written atomically, so only damage from outside gets here
            log.warning("ignoring shard %s: %s", path, exc)
            return None
        return shard if isinstance(shard, dict) and shard.get("key") == key else None

    def save(self, key: str, shard: dict[str, Any]) -> None:
        save_pickle(self.path(key), {**shard, "key": key})

    def clear(self) -> None:
        """Remove the folder and every shard in it (after the job's outputs are written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
