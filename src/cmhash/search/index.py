"""The code index: packed binary codes per modality, plus where they came from.

    <dir>/index.json    format, bits, modalities, count, source, the hash model (path, sha256), the
                        CLIP encoder (model, pretrained, random_init, seed, weights digest), and the
                        back end that holds the codes (absent in older indexes: faiss)
    <dir>/items.jsonl   one line per database row: id, image path and/or caption, label names
    <dir>/image.faiss   back end faiss (default): a FAISS binary index of the image codes (row i =
    <dir>/text.faiss    line i of items.jsonl), and the same for the text codes; its kind (flat,
                        ivf, hnsw: cmhash.search.kinds) and knobs are index.json's backend.index
                        back end milvus: Milvus collections instead (cmhash.search.milvus)

A folder is written whole or not at all (built next to its target, then renamed into place), and
read back with json, pydantic and faiss.read_index_binary (or Milvus) only: nothing in it can run code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from cmhash.config.choices.indexes import INDEXES
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


class IndexKind(Protocol):
    """How a modality's codes are held and searched (cmhash.search.kinds; params.yaml `search.index`)."""

    record: dict[str, Any]  # index.json's `index` entry: {"kind", "knobs", "rerank", "seed"}

    def build(self, packed: np.ndarray) -> faiss.IndexBinary: ...

    def opened(self, index: faiss.IndexBinary) -> faiss.IndexBinary: ...

    def topk(self, index: BinaryCodes, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def index_kind(record: dict[str, Any] | None) -> IndexKind:
    """The kind an index.json `index` entry names; none (an index from before kinds, or Milvus): flat."""
    if record is None:
        return INDEXES["flat"]()
    entry = INDEXES.entry(record["kind"])
    return entry.load()(entry.knobs.model_validate(record["knobs"]), record["rerank"], record["seed"])


class FaissFiles:
    """The default store: one FAISS binary index file per modality in the index folder, of the
    kind `kind` (flat: faiss.IndexBinaryFlat); the backend entry records the kind and its knobs."""

    def __init__(self, kind: IndexKind | None = None) -> None:
        self.kind = kind or index_kind(None)

    def write(self, folder: Path, packed: dict[str, np.ndarray]) -> dict[str, Any]:
        for modality, codes in packed.items():
            faiss.write_index_binary(self.kind.build(codes), str(folder / f"{modality}.faiss"))
        return {"name": "faiss", "index": self.kind.record}

    def read(self, folder: Path, backend: dict[str, Any], modalities: list[str]) -> dict[str, BinaryCodes]:
        kind = index_kind(backend.get("index"))
        return {m: kind.opened(faiss.read_index_binary(str(folder / f"{m}.faiss"))) for m in modalities}

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


def _within(index: BinaryCodes, queries: np.ndarray, kth: int, wide: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, every row of `index` at distance <= kth (one range search for them all)."""
    lims, dist, rows = index.range_search(queries, kth + 1)  # distance < radius
    return [(dist[lims[q]:lims[q + 1]], rows[lims[q]:lims[q + 1]]) for q in range(len(queries))]


def hamming_topk(index: BinaryCodes, queries: np.ndarray, k: int, wide: int | None = None,
                 tied: Callable[..., list[tuple[np.ndarray, np.ndarray]]] = _within) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by Hamming distance, ties broken by database row (lower first): exact for a flat index.

    queries: packed uint8 [Q, bits / 8]. Returns distances int32 and rows int64, both [Q, min(k, N)].
    `wide`: how many rows to ask the index for (default k + TIE_MARGIN; an approximate index: its
    candidates, ranked here by their exact distances). Where every row returned is tied with the
    k-th, more tied rows may exist: `tied(index, queries, kth, wide)` collects, per query, every row
    within the k-th distance (a range search; one call per distinct k-th distance), so the order
    never depends on FAISS's heap. An approximate index that finds fewer than k candidates pads
    with row -1 (distance int32 max)."""
    n = index.ntotal
    k = min(k, n)
    wide = min(n, max(k, wide or k + TIE_MARGIN))
    dist, rows = index.search(queries, wide)
    if dist.shape[1] < k:  # a store that caps its answers (Milvus: 16,384)
        raise ConfigError(f"the code store returns at most {dist.shape[1]} results a query; ask for fewer")
    dist = np.where(rows < 0, np.iinfo(np.int32).max, dist)
    order = np.lexsort((rows, dist), axis=1)[:, :k]
    top_dist, top_rows = np.take_along_axis(dist, order, 1), np.take_along_axis(rows, order, 1)
    maybe_cut = (dist[:, -1] == top_dist[:, -1]) & (top_rows[:, -1] >= 0) & (dist.shape[1] < n)
    for kth in np.unique(top_dist[maybe_cut, -1]):
        cut = np.flatnonzero(maybe_cut & (top_dist[:, -1] == kth))
        for q, (d, r) in zip(cut, tied(index, queries[cut], int(kth), wide)):
            r, first = np.unique(np.concatenate([r, rows[q]]), return_index=True)  # with the candidates (an approximate
            d = np.concatenate([d, dist[q]])[first]                                   # index may not find them again)
            ranked = np.lexsort((r, d))[:k]
            top_dist[q], top_rows[q] = d[ranked], r[ranked]
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

    @cached_property
    def kind(self) -> IndexKind:
        return index_kind(self.backend.get("index"))

    def topk(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-k rows of `modality`'s codes for packed queries, as the index's kind searches."""
        return self.kind.topk(self.codes[modality], queries, k)

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
