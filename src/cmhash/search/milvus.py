"""Codes in Milvus (the optional `milvus` extra: pymilvus 2.5 + Milvus Lite): one collection per
modality, {row: INT64 primary key, code: BINARY_VECTOR}, with a BIN_FLAT index (exact, every code
compared) and the HAMMING metric.

With no URI the codes go to Milvus Lite, an embedded Milvus that keeps them in one file, codes.db,
inside the index folder (so the folder stays whole: copied, replaced and removed as one). Milvus
Lite opens a file in one process at a time. With a URI (http://host:19530, https://…, tcp://…)
the same calls reach a Milvus server or cluster; MILVUS_TOKEN, if set, is sent as its token.
Collections are named cmhash_<build id>_<modality>, so indexes can share a server and a rebuild
never writes into the collections a running `cmhash serve` reads; the replaced index's
collections are dropped once the new index is in place.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from cmhash.errors import ConfigError, DataError
from cmhash.search.queries import QueryError

LITE_FILE = "codes.db"
SERVER_SCHEMES = ("http", "https", "tcp", "grpc")
MAX_TOPK = 16_384  # Milvus answers at most this many hits a query
INSERT_BATCH = 50_000  # rows per insert call: well under gRPC's message size limit
CONNECT_TIMEOUT_S = 10

# pymilvus logs each failed call on stderr handlers of its own (some of its loggers set their own
# level); here every failure reaches the user once, as a one-line DataError.
for _name in [name for name in logging.root.manager.loggerDict if name.split(".")[0] == "pymilvus"]:
    logging.getLogger(_name).setLevel(logging.CRITICAL)


def check_uri(uri: str | None) -> None:
    """None (Milvus Lite in the index folder) or a server URI."""
    if uri is not None and urlparse(uri).scheme not in SERVER_SCHEMES:
        raise ConfigError(f"--milvus-uri {uri!r}: give a Milvus server ({', '.join(s + '://' for s in SERVER_SCHEMES)}…), "
                          f"or no --milvus-uri for Milvus Lite, which keeps its file in the index folder")


def _connect(address: str) -> MilvusClient:
    try:
        with warnings.catch_warnings():  # milvus-lite 2.5.1 imports the deprecated pkg_resources
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            return MilvusClient(address, token=os.environ.get("MILVUS_TOKEN", ""), timeout=CONNECT_TIMEOUT_S)
    except MilvusException as exc:
        hint = (" (Milvus Lite opens a file in one process at a time: is a `cmhash serve` of this index running?)"
                if address.endswith(".db") else "")
        raise DataError(f"cannot open Milvus at {address}: {exc.message}{hint}") from None


@contextmanager
def _connection(address: str):
    """A client that is closed afterwards, and, for a Milvus Lite file, its embedded server stopped
    too (it would keep the file open: the index folder is renamed into place next)."""
    client = _connect(address)
    try:
        yield client
    finally:
        client.close()
        if address.endswith(".db"):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(address)


class MilvusCodes:
    """One modality's codes in a collection, answering the two calls cmhash.search.index.hamming_topk
    makes of a faiss.IndexBinary, with the same meaning: `search` the k nearest, `range_search`
    every code closer than a radius."""

    def __init__(self, client: MilvusClient, collection: str) -> None:
        self.client, self.collection = client, collection
        try:
            fields = client.describe_collection(collection)["fields"]
            self.ntotal = int(client.get_collection_stats(collection)["row_count"])
        except MilvusException as exc:
            raise DataError(f"Milvus collection {collection}: {exc.message}; rebuild the index with `cmhash index --backend milvus`") from None
        self.d = int(next(f["params"]["dim"] for f in fields if f["name"] == "code"))

    def _hits(self, queries: np.ndarray, limit: int, params: dict[str, Any]) -> list[list[dict[str, Any]]]:
        try:
            return self.client.search(self.collection, data=[q.tobytes() for q in queries], anns_field="code", limit=limit,
                                      search_params={"metric_type": "HAMMING", "params": params})
        except MilvusException as exc:  # the server went away, or dropped the collection
            raise QueryError(f"Milvus could not search {self.collection}: {exc.message}", 503) from None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        hits = self._hits(queries, min(k, MAX_TOPK), {})
        dist = np.array([[h["distance"] for h in q] for q in hits], dtype=np.int32)
        rows = np.array([[h["id"] for h in q] for q in hits], dtype=np.int64)
        return dist, rows

    def reconstruct(self, row: int) -> np.ndarray:
        """The packed code of one row (a query by indexed item), as faiss's reconstruct gives it."""
        try:
            hits = self.client.get(self.collection, ids=[row], output_fields=["code"])
        except MilvusException as exc:
            raise QueryError(f"Milvus could not read row {row} of {self.collection}: {exc.message}", 503) from None
        if not hits:
            raise QueryError(f"Milvus collection {self.collection} has no row {row}; rebuild the index with `cmhash index --backend milvus`", 503)
        return np.frombuffer(hits[0]["code"][0], dtype=np.uint8)

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like faiss: lims [Q + 1] into distances and rows of the codes at distance < radius, each query's
        in turn (at most MAX_TOPK a query)."""
        hits = self._hits(queries, min(self.ntotal, MAX_TOPK), {"radius": radius, "range_filter": 0})
        lims = np.cumsum([0] + [len(q) for q in hits])
        dist = np.array([h["distance"] for q in hits for h in q], dtype=np.int32)
        rows = np.array([h["id"] for q in hits for h in q], dtype=np.int64)
        return lims, dist, rows


class MilvusStore:
    """Where an index's codes go with `cmhash index --backend milvus`; see the module's docstring."""

    def __init__(self, uri: str | None = None) -> None:
        check_uri(uri)
        self.uri = uri
        if uri:  # a server that is down or refuses the token fails here, before anything is encoded
            with _connection(uri):
                pass

    def _address(self, folder: Path) -> str:
        return self.uri or str(folder / LITE_FILE)

    def write(self, folder: Path, packed: dict[str, np.ndarray]) -> dict[str, Any]:
        build = uuid.uuid4().hex[:12]
        names = {modality: f"cmhash_{build}_{modality}" for modality in packed}
        with _connection(self._address(folder)) as client:
            try:
                for modality, codes in packed.items():
                    _fill(client, names[modality], codes)
            except MilvusException as exc:
                for name in names.values():
                    client.drop_collection(name)
                raise DataError(f"cannot write codes to Milvus at {self._address(folder)}: {exc.message}") from None
        return {"name": "milvus", "uri": self.uri, "collections": names}

    def read(self, folder: Path, backend: dict[str, Any], modalities: list[str]) -> dict[str, MilvusCodes]:
        client = _connect(self._address(folder))  # open for as long as the index is used
        return {m: MilvusCodes(client, backend["collections"][m]) for m in modalities}

    def retire(self, backend: dict[str, Any]) -> None:
        """Drop a replaced index's collections from a server (a Milvus Lite file went with its folder)."""
        if self.uri:
            with _connection(self.uri) as client:
                for name in backend["collections"].values():
                    client.drop_collection(name)


def _fill(client: MilvusClient, name: str, codes: np.ndarray) -> None:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=codes.shape[1] * 8)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="code", index_type="BIN_FLAT", metric_type="HAMMING")
    # Strong consistency: a search right after the build sees every row (a server's default, Bounded, may not).
    client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")
    for start in range(0, len(codes), INSERT_BATCH):
        batch = codes[start : start + INSERT_BATCH]
        client.insert(name, [{"row": start + i, "code": code.tobytes()} for i, code in enumerate(batch)])
    client.flush(name)
