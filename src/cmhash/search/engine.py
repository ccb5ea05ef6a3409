"""Index a collection into packed binary codes, and search an index (the Searcher: loaded once,
a batch of queries a call): both encode exactly as the pipeline did (CLIP from the same seed and weights,
then the hash model under the strict protocol), so query and database codes are comparable."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cmhash.config.schema import ClipConfig
from cmhash.errors import CmhashError, ConfigError, DataError
from cmhash.features.clip import caption_is_cut
from cmhash.features.encoding import ClipEncoder
from cmhash.runtime.device import resolve_device
from cmhash.search.hashing import HashModel, load_hash_model
from cmhash.search.index import CodeIndex, CodeStore, code_store, pack_codes
from cmhash.search.queries import QueryError
from cmhash.search.sources import SOURCES, Sources

log = logging.getLogger("cmhash")

OTHER = {"image": "text", "text": "image"}  # a query of one modality searches the other


def build_index(source: str, value: Any, *, device_name: str, seed: int, clip: ClipConfig, bits: int,
                hash_dir: Path, features_dir: Path, prepare_dir: Path, out_dir: Path, store: CodeStore) -> None:
    """`seed` and `clip` are params.yaml's (the seed extract drew CLIP from; batch size and workers);
    `store` keeps the codes (FAISS files by default, or Milvus)."""
    device = resolve_device(device_name)
    if bits % 8:
        raise ConfigError(f"--bits {bits}: binary indexes need a multiple of 8 bits")
    checkpoint = hash_dir / str(bits) / "model.pt"
    if not checkpoint.is_file():
        raise DataError(f"no {bits}-bit hash model: {checkpoint} not found; run `cmhash train-hash` (or `dvc repro`) first")
    hash_model = load_hash_model(checkpoint, device)
    if hash_model.bits != bits:
        raise DataError(f"{checkpoint} makes {hash_model.bits}-bit codes, not {bits}")
    # The seed extract drew a random-init CLIP from: params' `seed`, unless the model recorded its own.
    clip_settings = {"seed": seed, **hash_model.clip_settings}
    ctx = Sources(hash_model, clip_settings, device, clip.batch_size, clip.num_workers, features_dir, prepare_dir)
    collection = SOURCES[source](value, ctx)
    packed = {m: pack_codes(hash_model.codes(f, m)) for m, f in collection.features.items()}
    meta = {"bits": bits, "source": {source: str(value)},
            "model": {"checkpoint": str(checkpoint), "sha256": hash_model.sha256},
            "clip": ctx.clip_record}
    replaced = _backend_of(out_dir)
    CodeIndex.save(out_dir, meta, collection.items, packed, store)
    if replaced:
        try:
            code_store(replaced).retire(replaced)
        except CmhashError as exc:  # the new index is in place; the old codes are only garbage now
            log.warning("could not drop the replaced index's codes: %s", exc)
    log.info("indexed %d item(s) (%s codes, %d bits) into %s", len(collection.items), " + ".join(sorted(packed)), bits, out_dir)


def _backend_of(index_dir: Path) -> dict[str, Any] | None:
    """The `backend` entry of the index about to be replaced, if there is a readable one."""
    try:
        return CodeIndex.load_meta(index_dir).get("backend")
    except CmhashError:
        return None


def _check_model(code_index: CodeIndex, hash_model: HashModel, index_dir: Path) -> None:
    built_with = code_index.meta["model"]
    if hash_model.bits != code_index.bits:
        raise DataError(f"model/index mismatch: {hash_model.checkpoint} makes {hash_model.bits}-bit codes but {index_dir} holds "
                        f"{code_index.bits}-bit codes; use --model {built_with['checkpoint']} "
                        f"or rebuild with `cmhash index --bits {hash_model.bits}`")
    if hash_model.sha256 != built_with["sha256"]:
        raise DataError(f"model/index mismatch: {hash_model.checkpoint} is not the model {index_dir} was built with "
                        "(sha256 differs: retrained since?); rebuild the index with `cmhash index`")


def _searched(code_index: CodeIndex, modality: str, index_dir: Path) -> str:
    """The modality a query of `modality` searches, if the index holds its codes."""
    target = OTHER[modality]
    if target not in code_index.codes:
        held = " and ".join(code_index.codes)
        instead = {"text": "a caption (--text)", "image": "an image (--image)"}[target]
        raise QueryError(f"{index_dir} holds only {held} codes but a {modality} query searches {target} codes; "
                         f"search with {instead} instead, or build an index with {target}s (`cmhash index --split retrieval`)")
    return target


def _has_encoder(code_index: CodeIndex) -> bool:
    """False for an index of precomputed features of an unknown CLIP model (data.features.clip_model: null)."""
    return code_index.meta["clip"].get("clip_model") is not None


def _no_encoder(index_dir: Path) -> QueryError:
    return QueryError(f"{index_dir} was built from precomputed features of an unknown CLIP model (data.features.clip_model: null): "
                      "a caption or an image cannot be encoded; query an indexed item instead (cmhash search --image-of ID or --text-of ID)")


@dataclass(frozen=True, eq=False)
class Query:
    """One checked query, ready to answer: made by Searcher.text_query, image_query, item_query or
    row_query. It holds exactly one of `text` (a caption), `pixels` (a preprocessed image) or `row`
    (an indexed row whose own `modality` code is the query)."""

    modality: str  # the query's modality; it searches the other one
    echo: dict[str, str]  # the answer's `query`
    top: int
    notes: tuple[str, ...] = ()
    text: str | None = None
    pixels: torch.Tensor | None = None
    row: int | None = None


@dataclass
class Searcher:
    """An index with its hash model and CLIP encoder, loaded once. `answer` answers a batch of
    queries: the captions are encoded as one batch, the images as another, and the codes are searched
    one batch per (searched modality, k). `search_text`, `search_image` and `search_item` answer
    one query each (a batch of one), as `cmhash search` asks. `cmhash serve` calls `answer` from
    worker threads: encoding holds a lock (one batch through the models at a time, with all of
    torch's threads), the code search after it does not. `encoder` is None where there is no CLIP
    model to encode with (precomputed features of an unknown one) or none is needed (`item` queries)."""

    index: CodeIndex
    index_dir: Path
    hash_model: HashModel
    encoder: ClipEncoder | None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, index_dir: Path, model: Path | None = None, device: str = "cpu", modality: str | None = None,
             item: bool = False) -> Searcher:
        """`model`: default, the one the index was built with. `modality`: the kind of query to come,
        checked against the index before the models load; `item`: it is an indexed item's own code
        (no CLIP needed)."""
        code_index = CodeIndex.load(index_dir)
        if modality:
            _searched(code_index, modality, index_dir)
            if not item and not _has_encoder(code_index):
                raise _no_encoder(index_dir)
        torch_device = resolve_device(device)
        hash_model = load_hash_model(model or Path(code_index.meta["model"]["checkpoint"]), torch_device)
        _check_model(code_index, hash_model, index_dir)
        hash_model.model.eval()
        encoder = ClipEncoder.load(code_index.meta["clip"], torch_device) if _has_encoder(code_index) and not item else None
        return cls(code_index, Path(index_dir), hash_model, encoder)

    def search_text(self, text: str, top: int) -> dict[str, Any]:
        """The `top` (>= 1) nearest images to a caption: a JSON-ready dict."""
        return self.answer([self.text_query(text, top)])[0]

    def search_image(self, image: Image.Image, name: str, top: int) -> dict[str, Any]:
        """The `top` (>= 1) nearest captions to a decoded image (`name`: its path or file name)."""
        return self.answer([self.image_query(image, name, top)])[0]

    def search_item(self, item_id: str, modality: str, top: int) -> dict[str, Any]:
        """The `top` (>= 1) nearest codes of the other modality to the `modality` code of the indexed
        item `item_id` (its first row with that id): the code is read back from the index and nothing is
        encoded; the item's own code of the other modality is ranked like any other."""
        return self.answer([self.item_query(item_id, modality, top)])[0]

    # Each *_query checks what the index can answer, so a batch of them fails only on a fault.
    def text_query(self, text: str, top: int) -> Query:
        encoder = self._encoder()
        _searched(self.index, "text", self.index_dir)
        notes = (f"the caption was cut to CLIP's context of {encoder.clip.tokenizer.context_length} tokens",
                 ) if caption_is_cut(encoder.clip, text) else ()
        return Query("text", {"text": text}, top, notes, text=text)

    def image_query(self, image: Image.Image, name: str, top: int) -> Query:
        encoder = self._encoder()
        _searched(self.index, "image", self.index_dir)
        return Query("image", {"image": name}, top, pixels=encoder.pixels(image))

    def item_query(self, item_id: str, modality: str, top: int) -> Query:
        """The `modality` code of the first row with id `item_id` (what --image-of / --text-of ID ask)."""
        self._held(modality)
        row = self._rows.get(item_id)
        if row is None:
            example = f" (ids as in its items.jsonl, e.g. {self.index.items[0]['id']!r})" if self.index.items else ""
            raise QueryError(f"no item {item_id!r} in {self.index_dir}{example}", 404)
        return Query(modality, {f"{modality}_of": item_id}, top, row=row)

    def row_query(self, row: int, modality: str, top: int) -> Query:
        """The `modality` code of database row `row`: the same query as item_query of its id, which
        names the id's first row (a note says so where `row` shares its id with an earlier row)."""
        self._held(modality)
        if not 0 <= row < len(self.index.items):
            raise QueryError(f"no row {row} in {self.index_dir}: rows are 0 to {len(self.index.items) - 1}", 404)
        item_id = str(self.index.items[row]["id"])
        first = self._rows[item_id]
        notes = (f"row {row} shares its id with row {first}, which --{modality}-of {item_id} would query",) if first != row else ()
        return Query(modality, {f"{modality}_of": item_id}, top, notes, row=row)

    def answer(self, queries: list[Query]) -> list[dict[str, Any]]:
        """The answer to each query, in order: exactly what each would get alone (an item's code never
        depends on its batch-mates, and each k is searched apart)."""
        packed = self._codes(queries)
        answers: list[dict[str, Any]] = [{}] * len(queries)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault((OTHER[query.modality], query.top), []).append(i)
        for (target, top), members in groups.items():
            dist, rows = self.index.topk(target, packed[members], top)
            for i, d, r in zip(members, dist, rows):
                answers[i] = self._found(queries[i], target, d, r)
        return answers

    def _codes(self, queries: list[Query]) -> np.ndarray:
        """The packed query codes [n, bits / 8]: captions and images encoded (one batch each, under
        the lock), items' codes read back from the index."""
        packed = np.zeros((len(queries), self.index.bits // 8), dtype=np.uint8)
        texts = [i for i, q in enumerate(queries) if q.text is not None]
        images = [i for i, q in enumerate(queries) if q.pixels is not None]
        if texts or images:
            encoder = self._encoder()
            with self.lock, torch.inference_mode():
                if texts:
                    packed[texts] = self._encoded(encoder.query_captions([queries[i].text for i in texts]), "text")
                if images:
                    packed[images] = self._encoded(encoder.query_images([queries[i].pixels for i in images]), "image")
        for i, query in enumerate(queries):
            if query.row is not None:
                packed[i] = self.index.codes[query.modality].reconstruct(query.row)
        return packed

    def _found(self, query: Query, target: str, dist: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
        items = self.index.items
        found = rows >= 0  # an approximate index can find fewer than `top`
        results = [{"rank": rank, "distance": int(d), "row": int(r), **items[r]}
                   for rank, (d, r) in enumerate(zip(dist[found], rows[found]), 1)]
        return {"query": query.echo, "searched": target, "bits": self.index.bits, "index": str(self.index_dir),
                "clip": self.clip, "notes": list(query.notes), "results": results}

    def _held(self, modality: str) -> None:
        """An item query with `modality` codes: the index must hold them, and the other modality's."""
        if modality not in self.index.codes:
            raise QueryError(f"{self.index_dir} holds no {modality} codes to query with; it holds {' and '.join(self.index.codes)} codes")
        _searched(self.index, modality, self.index_dir)

    @cached_property
    def _rows(self) -> dict[str, int]:
        rows: dict[str, int] = {}
        for row, item in enumerate(self.index.items):
            rows.setdefault(str(item["id"]), row)
        return rows

    def _encoder(self) -> ClipEncoder:
        if self.encoder is None:
            raise _no_encoder(self.index_dir)
        return self.encoder

    def _encoded(self, features: np.ndarray, modality: str) -> np.ndarray:
        return pack_codes(self.hash_model.codes(features, modality))

    @property
    def clip(self) -> dict[str, Any]:
        return {k: self.index.meta["clip"].get(k) for k in ("clip_model", "pretrained", "random_init")}

    def info(self) -> dict[str, Any]:
        """What is being searched: the index, its codes, the models; a notice if CLIP is random-init or unknown."""
        meta = self.index.meta
        notice = None
        if not _has_encoder(self.index):
            notice = "codes come from precomputed features of an unknown CLIP model: a caption or an image cannot be searched with"
        elif self.clip["random_init"]:
            notice = "codes come from a random-init CLIP (pretrained: none): results test the pipeline, not the method"
        return {"index": str(self.index_dir), "count": len(self.index.items), "bits": self.index.bits,
                "modalities": sorted(self.index.codes), "source": meta["source"], "backend": self.index.backend["name"],
                "index_kind": self.index.kind.record,
                "model": {"checkpoint": str(self.hash_model.checkpoint), "sha256": self.hash_model.sha256},
                "clip": {**self.clip, "seed": meta["clip"].get("seed")}, "notice": notice}
