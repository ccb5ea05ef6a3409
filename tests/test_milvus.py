"""`cmhash index --backend milvus`: codes in Milvus (BINARY_VECTOR, BIN_FLAT, HAMMING) give the
same top-k as the FAISS index, through `cmhash search` and `cmhash serve` alike; Milvus Lite by
default, a Milvus server by URI (here Milvus Lite's own server on 127.0.0.1); every error one line.
Needs the milvus extra (`pip install -e '.[milvus]'`); without it these tests are skipped, except
the one that checks the error a missing extra gives."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cmhash.search.engine import Searcher
from cmhash.search.index import CodeIndex, pack_codes
from cmhash.serve.app import create_app
from test_serve import CMHASH, query_items, searcher, served

FIXTURES = (searcher, served)  # test_serve's, found here by pytest under these names

INSTALLED = all(importlib.util.find_spec(name) for name in ("pymilvus", "milvus_lite"))
needs_milvus = pytest.mark.skipif(not INSTALLED, reason="the milvus extra is not installed: pip install -e '.[milvus]'")


def ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def milvus_index(served, invoke, tmp_path):
    """The split index with its codes in Milvus Lite; its embedded server is stopped afterwards."""
    ok(invoke("index", "--split", "retrieval", "--params", "params.yaml", "--backend", "milvus", "--out-dir", tmp_path / "milvus_index"))
    yield tmp_path / "milvus_index"
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(tmp_path / "milvus_index" / "codes.db"))


@needs_milvus
@pytest.mark.slow
def test_milvus_finds_what_faiss_finds(searcher, milvus_index):
    """Every query item, both directions, k = 1, 10 and the whole database: the same distances as
    the FAISS index, and (ties broken by row here too) the same rows."""
    assert sorted(p.name for p in milvus_index.iterdir()) == ["codes.db", "index.json", "items.jsonl"]  # nothing left open
    index = CodeIndex.load(milvus_index)
    assert index.meta["backend"]["name"] == "milvus" and index.meta["backend"]["uri"] is None
    assert index.items == searcher.index.items and index.meta["count"] == 60
    milvus = Searcher.load(milvus_index)
    assert milvus.info()["backend"] == "milvus"
    for item in query_items():
        picture = Image.open(item.image).convert("RGB")
        for k in (1, 10, 60):
            assert milvus.search_text(item.caption, k)["results"] == searcher.search_text(item.caption, k)["results"]
            assert milvus.search_image(picture, item.image, k)["results"] == searcher.search_image(picture, item.image, k)["results"]


@needs_milvus
@pytest.mark.slow
def test_milvus_on_its_own_orders_ties_its_own_way(searcher, milvus_index):
    """What Milvus's search returns before the tie rule: the same multiset of top-k distances as
    FAISS, in an order among ties that is its own (why hamming_topk re-sorts by row)."""
    milvus = CodeIndex.load(milvus_index).codes["image"]
    faiss_codes = searcher.index.codes["image"]
    queries = np.stack([pack_codes(searcher.hash_model.codes(searcher.encoder.captions([it.caption]), "text"))[0] for it in query_items()])
    for k in (5, 20):
        milvus_dist, _ = milvus.search(queries, k)
        faiss_dist, _ = faiss_codes.search(queries, k)
        np.testing.assert_array_equal(np.sort(milvus_dist, axis=1), np.sort(faiss_dist, axis=1))


@needs_milvus
@pytest.mark.slow
def test_search_and_serve_answer_from_milvus(milvus_index, invoke):
    caption = query_items()[0].caption
    cli = json.loads(ok(invoke("search", "--index-dir", milvus_index, "--text", caption, "-k", 8, "--json")).stdout)
    client = TestClient(create_app(Searcher.load(milvus_index)))
    assert client.get("/api/search", params={"text": caption, "k": 8}).json() == cli
    assert client.get("/api/info").json()["backend"] == "milvus"
    assert client.get("/api/items/3/image").status_code == 200


@needs_milvus
@pytest.mark.slow
def test_milvus_lite_is_one_process_at_a_time(milvus_index):
    """This process holds the Milvus Lite file open (the index is loaded): a second process gets one line."""
    Searcher.load(milvus_index)
    found = subprocess.run([str(CMHASH), "search", "--index-dir", str(milvus_index), "--text", "a ring"],
                           capture_output=True, text=True, timeout=120)
    assert found.returncode == 1 and "Traceback" not in found.stderr
    assert found.stderr.strip().splitlines()[-1].startswith("error: cannot open Milvus at ")
    assert "one process at a time" in found.stderr


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


@pytest.fixture
def milvus_server(tmp_path):
    """Milvus Lite's own gRPC server on 127.0.0.1, standing in for a Milvus server or cluster."""
    from milvus_lite.server import Server

    port = free_port()
    server = Server(str(tmp_path / "server.db"), f"127.0.0.1:{port}")
    assert server.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    server.stop()


@needs_milvus
@pytest.mark.slow
def test_a_milvus_server_by_uri(served, invoke, milvus_server, searcher, tmp_path):
    """The same code against a server: the index names its collections, a rebuild drops the ones
    it replaced, a query gives FAISS's answer."""
    from pymilvus import MilvusClient

    build = ("index", "--split", "retrieval", "--params", "params.yaml", "--backend", "milvus", "--milvus-uri", milvus_server,
             "--out-dir", tmp_path / "remote")
    ok(invoke(*build))
    first = CodeIndex.load_meta(tmp_path / "remote")["backend"]
    assert first["uri"] == milvus_server and sorted(p.name for p in (tmp_path / "remote").iterdir()) == ["index.json", "items.jsonl"]
    ok(invoke(*build))
    second = CodeIndex.load_meta(tmp_path / "remote")["backend"]
    assert sorted(MilvusClient(milvus_server).list_collections()) == sorted(second["collections"].values())
    assert set(first["collections"].values()).isdisjoint(second["collections"].values())
    remote = Searcher.load(tmp_path / "remote")
    caption = query_items()[1].caption
    assert remote.search_text(caption, 10)["results"] == searcher.search_text(caption, 10)["results"]
    MilvusClient(milvus_server).drop_collection(second["collections"]["image"])  # the server lost the codes
    gone = TestClient(create_app(remote)).get("/api/search", params={"text": caption})
    assert gone.status_code == 503 and gone.json()["error"].startswith("Milvus could not search cmhash_")


@needs_milvus
@pytest.mark.slow
def test_milvus_errors_are_one_line(served, invoke, one_line_error, milvus_index, tmp_path):
    index = ("index", "--split", "retrieval", "--params", "params.yaml", "--out-dir", tmp_path / "other")
    assert "unknown --backend 'redis'" in one_line_error(invoke(*index, "--backend", "redis"))
    assert "--milvus-uri goes with --backend milvus" in one_line_error(invoke(*index, "--milvus-uri", "http://127.0.0.1:1"))
    assert "give a Milvus server" in one_line_error(invoke(*index, "--backend", "milvus", "--milvus-uri", "codes.db"))
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert f"cannot open Milvus at {down}" in one_line_error(invoke(*index, "--backend", "milvus", "--milvus-uri", down))
    assert not (tmp_path / "other").exists()
    meta = json.loads((milvus_index / "index.json").read_text())
    meta["backend"]["collections"]["text"] = "cmhash_gone_text"
    (milvus_index / "index.json").write_text(json.dumps(meta))
    message = one_line_error(invoke("search", "--index-dir", milvus_index, "--text", "a ring"))
    assert "Milvus collection cmhash_gone_text" in message and "rebuild the index" in message


def test_without_the_extra_the_backend_names_it(params_file, invoke, one_line_error, monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "cmhash.search.milvus", raising=False)
    message = one_line_error(invoke("index", "--split", "retrieval", "--params", params_file, "--backend", "milvus"))
    assert "needs the milvus extra (pymilvus is missing): pip install -e '.[milvus]'" in message


class CappedCodes:
    """FAISS codes behind a store that answers at most `cap` hits a query, as Milvus does (16,384)."""

    def __init__(self, codes, cap: int) -> None:
        self.codes, self.cap, self.ntotal, self.d = codes, cap, codes.ntotal, codes.d

    def search(self, queries, k):
        return self.codes.search(queries, min(k, self.cap))

    def range_search(self, queries, radius):
        return self.codes.range_search(queries, radius)


def test_k_past_what_the_store_answers_is_refused_not_cut_short():
    from cmhash.errors import ConfigError
    from cmhash.search.index import binary_index, hamming_topk

    rng = np.random.default_rng(0)
    db, query = rng.integers(0, 256, (500, 2), dtype=np.uint8), rng.integers(0, 256, (1, 2), dtype=np.uint8)
    capped, exact = CappedCodes(binary_index(db), 40), binary_index(db)
    for k in (1, 8, 39, 40):  # within the cap; k + 32 past it is still exact (the tie rule's range search)
        for got, want in zip(hamming_topk(capped, query, k), hamming_topk(exact, query, k)):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ConfigError, match="returns at most 40 results a query"):
        hamming_topk(capped, query, 41)
