"""The code index: packed binary codes per modality, plus where they came from.

    <dir>/index.json    format, bits, modalities, count, source, the hash model (path, sha256), the
                        CLIP encoder (model, pretrained, random_init, seed, weights digest), and the
                        back end that holds the codes (absent in older indexes: faiss)
    <dir>/items.jsonl   one line per database row: id, image path and/or caption, label names
    <dir>/image.faiss   back end faiss (default): faiss.IndexBinaryFlat of the image codes (row i =
    <dir>/text.faiss    line i of items.jsonl), and the same for the text codes
                        back end milvus: Milvus collections instead (cmhash.search.milvus)

A folder is written whole or not at all (built next to its target, then renamed into place), and
read back with json and faiss.read_index_binary (or Milvus) only: nothing in it can run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from cmhash.errors import ConfigError, DataError
from cmhash.io import atomic_dir, write_json

MODALITIES = ("image", "text")
META_FILE, ITEMS_FILE = "index.json", "items.jsonl"
FORMAT = 1
DEFAULT_BACKEND = {"name": "faiss"}  # what an index.json without a `backend` entry (written before Milvus) used
# FAISS keeps an arbitrary subset of the items tied at the k-th distance; asking for this many
# more rows usually reaches past the tie, so the exact tie rule rarely needs a second scan.
TIE_MARGIN = 32


class BinaryCodes(Protocol):
    """What search needs of a modality's codes: faiss.IndexBinary has it, and so does
    cmhash.search.milvus.MilvusCodes (the same calls, answered by Milvus)."""

    ntotal: int
    d: int  # bits

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def reconstruct(self, row: int) -> np.ndarray: ...  # the packed code of one row, uint8 [bits / 8]


class CodeStore(Protocol):
    """Where an index keeps its codes. `write` stores them (files go in `folder`, the index folder
    being built) and returns the index.json `backend` entry that `read` opens them from again;
    `retire` frees what a replaced index held outside its folder."""

    def write(self, folder: Path, packed: dict[str, np.ndarray]) -> dict[str, Any]: ...

    def read(self, folder: Path, backend: dict[str, Any], modalities: list[str]) -> dict[str, BinaryCodes]: ...

    def retire(self, backend: dict[str, Any]) -> None: ...


class FaissFiles:
    """The default store: one faiss.IndexBinaryFlat file per modality in the index folder."""

    def write(self, folder: Path, packed: dict[str, np.ndarray]) -> dict[str, Any]:
        for modality, codes in packed.items():
            faiss.write_index_binary(binary_index(codes), str(folder / f"{modality}.faiss"))
        return {"name": "faiss"}

    def read(self, folder: Path, backend: dict[str, Any], modalities: list[str]) -> dict[str, BinaryCodes]:
        return {m: faiss.read_index_binary(str(folder / f"{m}.faiss")) for m in modalities}

    def retire(self, backend: dict[str, Any]) -> None:
        """Nothing: the files went with the replaced folder."""


def code_store(backend: dict[str, Any]) -> CodeStore:
    """The store an index.json `backend` entry names ({"name": "faiss"} or {"name": "milvus", "uri": ...})."""
    if backend["name"] == "faiss":
        return FaissFiles()
    if backend["name"] == "milvus":
        try:
            from cmhash.search.milvus import MilvusStore  # the optional extra: imported only when asked for
        except ImportError as exc:
            raise ConfigError(f"the milvus back end needs the milvus extra ({exc.name} is missing): pip install -e '.[milvus]'") from None
        return MilvusStore(backend.get("uri"))
    raise DataError(f"unknown code back end {backend['name']!r}; use faiss or milvus")


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """±1 codes [N, bits] -> uint8 [N, bits / 8], bit set where the code is +1 (as evaluate saves them)."""
    return np.packbits(np.asarray(codes) > 0, axis=1)


def binary_index(packed: np.ndarray) -> faiss.IndexBinaryFlat:
    index = faiss.IndexBinaryFlat(packed.shape[1] * 8)
    index.add(np.ascontiguousarray(packed, dtype=np.uint8))
    return index


def hamming_topk(index: BinaryCodes, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k rows by Hamming distance, ties broken by database row (lower first).

    queries: packed uint8 [Q, bits / 8]. Returns distances int32 and rows int64, both [Q, min(k, N)].
    Where every row FAISS returned is tied with the k-th, more tied rows may exist: those queries
    collect every row within the k-th distance with a range search, so the order never depends on
    FAISS's heap."""
    n = index.ntotal
    k = min(k, n)
    wide = min(n, k + TIE_MARGIN)
    dist, rows = index.search(queries, wide)
    if dist.shape[1] < k:  # a store that caps its answers (Milvus: 16,384)
        raise ConfigError(f"the code store returns at most {dist.shape[1]} results a query; ask for fewer")
    order = np.lexsort((rows, dist), axis=1)[:, :k]
    top_dist, top_rows = np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
    maybe_cut = (dist[:, -1] == top_dist[:, -1]) & (dist.shape[1] < n)
    for q in np.flatnonzero(maybe_cut):
        _, d, r = index.range_search(queries[q : q + 1], int(top_dist[q, -1]) + 1)  # distance < radius
        tied = np.lexsort((r, d))[:k]
        top_dist[q], top_rows[q] = d[tied], r[tied]
    return top_dist.astype(np.int32), top_rows.astype(np.int64)


@dataclass
class CodeIndex:
    meta: dict[str, Any]
    items: list[dict[str, Any]]
    codes: dict[str, BinaryCodes]  # modality -> its codes, row i = items[i]

    @property
    def bits(self) -> int:
        return int(self.meta["bits"])

    @property
    def backend(self) -> dict[str, Any]:
        return self.meta.get("backend", DEFAULT_BACKEND)

    @staticmethod
    def save(directory: Path, meta: dict[str, Any], items: list[dict[str, Any]], packed: dict[str, np.ndarray], store: CodeStore) -> None:
        """Write an index: `packed` codes (uint8 [N, bits / 8] per modality, row i = items[i]) into `store`."""
        with atomic_dir(Path(directory)) as tmp:
            backend = store.write(tmp, packed)
            (tmp / ITEMS_FILE).write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
            write_json(tmp / META_FILE, {**meta, "format": FORMAT, "modalities": sorted(packed), "count": len(items), "backend": backend})

    @staticmethod
    def load_meta(directory: Path) -> dict[str, Any]:
        """index.json alone (no codes opened)."""
        directory = Path(directory)
        if not (directory / META_FILE).is_file():
            raise DataError(f"no index in {directory}; build one first: `cmhash index --split retrieval` (or --images DIR, --captions FILE)")
        try:
            return json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read {directory / META_FILE} ({type(exc).__name__}); rebuild the index with `cmhash index`") from None

    @classmethod
    def load(cls, directory: Path) -> CodeIndex:
        directory = Path(directory)
        meta = cls.load_meta(directory)
        try:
            items = [json.loads(line) for line in (directory / ITEMS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
            backend = meta.get("backend", DEFAULT_BACKEND)
            codes = code_store(backend).read(directory, backend, meta["modalities"])
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            raise DataError(f"cannot read the index in {directory} ({reason}); rebuild it with `cmhash index`") from None
        if meta.get("format") != FORMAT or any(ix.ntotal != len(items) or ix.d != int(meta["bits"]) for ix in codes.values()):
            raise DataError(f"the index in {directory} is inconsistent or from another version; rebuild it with `cmhash index`")
        return cls(meta, items, codes)
