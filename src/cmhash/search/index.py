"""The code index: packed binary codes per modality in FAISS binary indexes, plus where they came from.

    <dir>/index.json    format, bits, modalities, count, source, the hash model (path, sha256), the
                        CLIP encoder (model, pretrained, random_init, seed, weights digest)
    <dir>/items.jsonl   one line per database row: id, image path and/or caption, label names
    <dir>/image.faiss   faiss.IndexBinaryFlat of the image codes (row i = line i of items.jsonl)
    <dir>/text.faiss    the same for the text codes

A folder is written whole or not at all (built next to its target, then renamed into place), and
read back with json and faiss.read_index_binary only: nothing in it can run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cmhash.errors import DataError
from cmhash.io import atomic_dir, write_json

MODALITIES = ("image", "text")
META_FILE, ITEMS_FILE = "index.json", "items.jsonl"
FORMAT = 1
# FAISS keeps an arbitrary subset of the items tied at the k-th distance; asking for this many
# more rows usually reaches past the tie, so the exact tie rule rarely needs a second scan.
TIE_MARGIN = 32


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """±1 codes [N, bits] -> uint8 [N, bits / 8], bit set where the code is +1 (as evaluate saves them)."""
    return np.packbits(np.asarray(codes) > 0, axis=1)


def binary_index(packed: np.ndarray) -> faiss.IndexBinaryFlat:
    index = faiss.IndexBinaryFlat(packed.shape[1] * 8)
    index.add(np.ascontiguousarray(packed, dtype=np.uint8))
    return index


def hamming_topk(index: faiss.IndexBinary, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows by Hamming distance, ties broken by database row (lower first).

    queries: packed uint8 [Q, bits / 8]. Returns distances int32 and rows int64, both [Q, min(k, N)].
    Where every row FAISS returned is tied with the k-th, more tied rows may exist: those queries
    collect every row within the k-th distance with a range search, so the order never depends on
    FAISS's heap."""
    n = index.ntotal
    k = min(k, n)
    wide = min(n, k + TIE_MARGIN)
    dist, rows = index.search(queries, wide)
    order = np.lexsort((rows, dist), axis=1)[:, :k]
    top_dist, top_rows = np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
    maybe_cut = (dist[:, -1] == top_dist[:, -1]) & (wide < n)
    for q in np.flatnonzero(maybe_cut):
        _, d, r = index.range_search(queries[q : q + 1], int(top_dist[q, -1]) + 1)  # distance < radius
        tied = np.lexsort((r, d))[:k]
        top_dist[q], top_rows[q] = d[tied], r[tied]
    return top_dist.astype(np.int32), top_rows.astype(np.int64)


@dataclass
class CodeIndex:
    meta: dict[str, Any]
    items: list[dict[str, Any]]
    codes: dict[str, faiss.IndexBinary]  # modality -> its codes, row i = items[i]

    @property
    def bits(self) -> int:
        return int(self.meta["bits"])

    def save(self, directory: Path) -> None:
        with atomic_dir(Path(directory)) as tmp:
            for modality, index in self.codes.items():
                faiss.write_index_binary(index, str(tmp / f"{modality}.faiss"))
            (tmp / ITEMS_FILE).write_text("".join(json.dumps(item) + "\n" for item in self.items), encoding="utf-8")
            write_json(tmp / META_FILE, {**self.meta, "format": FORMAT, "modalities": sorted(self.codes), "count": len(self.items)})

    @classmethod
    def load(cls, directory: Path) -> "CodeIndex":
        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise DataError(f"no index in {directory}; build one first: `cmhash index --split retrieval` (or --images DIR, --captions FILE)")
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            items = [json.loads(line) for line in (directory / ITEMS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
            codes = {m: faiss.read_index_binary(str(directory / f"{m}.faiss")) for m in meta["modalities"]}
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise DataError(f"cannot read the index in {directory} ({type(exc).__name__}: {str(exc).splitlines()[0]}); rebuild it with `cmhash index`") from None
        if meta.get("format") != FORMAT or any(ix.ntotal != len(items) or ix.d != int(meta["bits"]) for ix in codes.values()):
            raise DataError(f"the index in {directory} is inconsistent or from another version; rebuild it with `cmhash index`")
        return cls(meta, items, codes)
