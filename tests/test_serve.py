"""`cmhash serve`: the API answers what `cmhash search --json` prints, from one loaded Searcher;
only indexed images are sent; every bad query is a 4xx JSON error and the server goes on;
concurrent clients get their own answers while the event loop stays free; the real command binds
127.0.0.1 and stops cleanly.

The tiny pipeline and its split index are built once per session (`served`); test_browser.py
and test_milvus.py import these fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient

from cmhash.data.manifest import read_split
from cmhash.errors import ConfigError
from cmhash.search.engine import Searcher
from cmhash.serve.app import create_app
from cmhash.serve.batching import MicroBatcher
from cmhash.serve.command import listen
from cmhash.serve.files import IndexedImages
from cmhash.serve.limits import Batching, Limits

PIPELINE = ("prepare", "extract", "train-fusion", "train-hash", "evaluate")
CMHASH = Path(sys.executable).with_name("cmhash")
_BUILT: dict = {}  # one tiny pipeline and one loaded Searcher for the whole session (every module that imports this)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def served(params, invoke, tmp_path_factory, monkeypatch) -> Path:
    """The tiny pipeline (conftest `params`) and `cmhash index --split retrieval`, built once; the
    working directory is its folder (item paths are relative to it). Tests only read it."""
    if "root" not in _BUILT:
        root = tmp_path_factory.mktemp("served")
        monkeypatch.chdir(root)
        Path("params.yaml").write_text(yaml.safe_dump(params))
        for command in PIPELINE:
            ok(invoke(command, "--params", "params.yaml"))
        ok(invoke("index", "--split", "retrieval", "--params", "params.yaml"))
        _BUILT["root"] = root
    monkeypatch.chdir(_BUILT["root"])
    return Path("stages/index")


@pytest.fixture
def searcher(served) -> Searcher:
    if "searcher" not in _BUILT:
        _BUILT["searcher"] = Searcher.load(served)
    return _BUILT["searcher"]


@pytest.fixture
def client(searcher) -> TestClient:
    return TestClient(create_app(searcher))


def query_items() -> list:
    return read_split(Path("stages/prepare/query.jsonl"))


@contextlib.contextmanager
def running_serve(index_dir: Path, *options: str, sigint=signal.SIG_DFL) -> Iterator[str]:
    """The real `cmhash serve --port 0` in a subprocess, started with `sigint` as its inherited SIGINT
    disposition (set in the child, so the test runner's own disposition never leaks in): yields its
    URL; then Ctrl+C (SIGINT) must stop it cleanly: uvicorn's shutdown, exit code 130 (the shell's
    code for Ctrl+C), no traceback."""
    proc = subprocess.Popen([str(CMHASH), "serve", "--index-dir", str(index_dir), "--port", "0", *options], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("serving ") for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("cmhash serve did not start:\n" + "".join(lines))
            time.sleep(0.1)
        yield next(line for line in lines if line.startswith("serving ")).split(" on ")[1].split()[0]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        reader.join(timeout=10)
    log = "".join(lines)
    assert code == 130 and "Application shutdown complete" in log and "Traceback" not in log, log


@pytest.fixture
def live_server(served) -> Iterator[str]:
    with running_serve(served) as url:
        yield url


# ---------------------------------------------------------------- the same answers as the CLI


@pytest.mark.slow
def test_the_api_answers_exactly_what_the_cli_prints(client, invoke):
    """Text by GET and by POST JSON, images by multipart upload: the JSON of `cmhash search --json`,
    ties in the same order (the tiny 16-bit codes tie a lot: rows in the results share distances)."""
    items = query_items()
    for item in items[:4]:
        cli = json.loads(ok(invoke("search", "--text", item.caption, "-k", 15, "--json")).stdout)
        assert client.get("/api/search", params={"text": item.caption, "k": 15}).json() == cli
        assert client.post("/api/search", json={"text": item.caption, "k": 15}).json() == cli
        distances = [r["distance"] for r in cli["results"]]
        assert len(set(distances)) < len(distances)  # ties were there to order
    for item in items[:3]:
        cli = json.loads(ok(invoke("search", "--image", item.image, "-k", 12, "--json")).stdout)
        with open(item.image, "rb") as f:
            answer = client.post("/api/search", files={"image": (Path(item.image).name, f, "image/png")}, data={"k": "12"}).json()
        assert answer == {**cli, "query": {"image": Path(item.image).name}}  # the upload's name instead of the CLI's path
    assert client.get("/api/search", params={"text": "a red circle"}).json()["results"][-1]["rank"] == 10  # default k


@pytest.mark.slow
def test_info_and_health(client, served):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/api/info").json()
    meta = json.loads((served / "index.json").read_text())
    assert info["bits"] == 16 and info["count"] == meta["count"] == 60 and info["modalities"] == ["image", "text"]
    assert info["backend"] == "faiss" and info["source"] == {"split": "retrieval"}
    assert info["index_kind"] == meta["backend"]["index"] == {"kind": "flat", "knobs": {}, "rerank": 4, "seed": 2023}
    assert info["model"] == meta["model"]
    assert info["clip"] == {"clip_model": "cmhash-tiny", "pretrained": "none", "random_init": True, "seed": 2023}
    assert "random-init CLIP" in info["notice"]
    assert info["limits"] == {"max_upload_bytes": 10 * 2**20, "max_pixels": None, "max_text_chars": 1000, "max_k": 100, "default_k": 10}
    assert info["batching"] == {"size": 32, "wait_ms": 2.0}
    page = client.get("/")
    assert page.status_code == 200 and "cmhash search" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


@pytest.mark.slow
def test_item_queries_answer_what_the_cli_prints(client, searcher, invoke):
    """GET /api/items/{row}/similar?target=text is `cmhash search --image-of <its id>`, target=image
    is `--text-of`: the same JSON, ties in the same order."""
    items = searcher.index.items
    assert len({item["id"] for item in items}) == len(items)  # unique ids: each row is its id's first row
    for row in (0, 17, 59):
        for target, option in (("text", "--image-of"), ("image", "--text-of")):
            cli = json.loads(ok(invoke("search", option, items[row]["id"], "-k", 9, "--json")).stdout)
            answer = client.get(f"/api/items/{row}/similar", params={"target": target, "k": 9})
            assert answer.status_code == 200 and answer.json() == cli, (row, target)
            assert cli["searched"] == target and len(cli["results"]) == 9
    assert len(client.get("/api/items/3/similar", params={"target": "image"}).json()["results"]) == 10  # default k


@pytest.mark.slow
def test_bad_item_queries_are_one_line_4xx(client, searcher):
    bad = {
        "a row past the end": ("/api/items/60/similar?target=text", 404, "no row 60 in stages/index: rows are 0 to 59"),
        "a row that is not a number": ("/api/items/abc/similar?target=text", 404, "no row 'abc': a row is a whole number from 0 to 59"),
        "a negative row": ("/api/items/-1/similar?target=image", 404, "no row '-1'"),
        "a row of 5,000 digits": ("/api/items/" + "9" * 5000 + "/similar?target=text", 404, "a row is a whole number"),
        "no target": ("/api/items/0/similar", 400, "target must be image or text (got null)"),
        "another target": ("/api/items/0/similar?target=audio", 400, 'target must be image or text (got "audio")'),
        "k = 0": ("/api/items/0/similar?target=text&k=0", 400, "k must be at least 1 (got 0)"),
        "k over the maximum": ("/api/items/0/similar?target=text&k=101", 400, "k must be at most 100 (got 101)"),
        "k not a number": ("/api/items/0/similar?target=text&k=many", 400, 'k must be a whole number (got "many")'),
    }
    for case, (url, status, message) in bad.items():
        answer = client.get(url)
        assert answer.status_code == status, (case, answer.text)
        assert message in answer.json()["error"] and len(answer.json()["error"].splitlines()) == 1, (case, answer.json())
    assert client.get("/api/items/" + "9" * 5000 + "/image").status_code == 404
    assert client.get("/api/items/0/similar?target=text&k=2").status_code == 200


def captions_only_client(invoke, tmp_path: Path) -> TestClient:
    """A client of a server on an index of two captions: text codes only, no images."""
    Path(tmp_path / "captions.txt").write_text("a red heart\na blue ring\n")
    ok(invoke("index", "--captions", tmp_path / "captions.txt", "--params", "params.yaml", "--out-dir", tmp_path / "caption_index"))
    return TestClient(create_app(Searcher.load(tmp_path / "caption_index")))


@pytest.mark.slow
def test_an_item_query_on_an_index_of_one_modality(served, invoke, searcher, tmp_path):
    client = captions_only_client(invoke, tmp_path)
    for target, message in (("image", "holds only text codes but a text query searches image codes"),
                            ("text", "holds no image codes to query with")):
        refused = client.get("/api/items/0/similar", params={"target": target})
        assert refused.status_code == 400 and message in refused.json()["error"], refused.json()


# ---------------------------------------------------------------- item images


@pytest.mark.slow
def test_item_images_come_only_from_the_index(client, searcher):
    first = searcher.index.items[0]["image"]
    answer = client.get("/api/items/0/image")
    assert answer.status_code == 200 and answer.content == Path(first).read_bytes()
    assert answer.headers["content-type"] == "image/png" and answer.headers["x-content-type-options"] == "nosniff"
    for row in ("60", "999999999999", "-1", "abc", "0x1", "1.0", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "..%2Fstages%2Findex%2Findex.json",
                "%C2%B2", "0%00"):
        refused = client.get(f"/api/items/{row}/image")
        assert refused.status_code == 404, row
        assert "error" in refused.json()
    assert client.get("/api/items/../../../etc/passwd").status_code == 404


def test_links_out_of_the_indexed_folders_are_refused(tmp_path):
    """A listed image that is a symlink: sent if it resolves inside an indexed root, 404 otherwise."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (photos / "a.png", photos / "sub" / "b.png", elsewhere / "secret.png"):
        path.write_bytes(b"\x89PNG...")
    (photos / "sub" / "up.png").symlink_to(photos / "a.png")  # out of sub/, still inside photos/
    (photos / "out.png").symlink_to(elsewhere / "secret.png")
    (photos / "passwd.png").symlink_to("/etc/passwd")
    listed = [photos / "a.png", photos / "sub" / "b.png", photos / "sub" / "up.png", photos / "out.png", photos / "passwd.png"]
    items = [{"id": str(i), "image": str(path)} for i, path in enumerate(listed)] + [{"id": "c", "caption": "no image"}]

    by_folder = IndexedImages(items, {"images": str(photos)})
    assert [by_folder.path(str(row)) for row in range(6)] == [photos / "a.png", photos / "sub" / "b.png", photos / "a.png", None, None, None]
    by_parents = IndexedImages(items, {"split": "retrieval"})  # roots: the folders the listed paths are in
    assert by_parents.path("3") is None and by_parents.path("4") is None and by_parents.path("2") == photos / "a.png"
    (photos / "a.png").unlink()
    assert by_folder.path("0") is None and by_folder.path("2") is None  # gone since indexing


def test_images_inside_tar_shards_are_read_from_their_shard(tmp_path):
    """A listed `shard.tar#member` (webdataset input): the member's bytes, from an indexed root only;
    a member not in the shard, a shard outside the roots, or a shard cut short since: None."""
    from fixtures_datasets import write_webdataset_shard

    shards, elsewhere = tmp_path / "shards", tmp_path / "elsewhere"
    samples = [{"__key__": f"{row:09d}", "jpg": bytes([row]) * (100 + row), "txt": f"caption {row}"} for row in range(3)]
    shard = write_webdataset_shard(shards, 0, samples)
    write_webdataset_shard(elsewhere, 0, samples)
    (shards / "00009.tar").symlink_to(elsewhere / "00000.tar")
    refs = [f"{shard}#000000000.jpg", f"{shard}#000000002.jpg", f"{shard}#000000009.jpg", f"{shards / '00009.tar'}#000000000.jpg"]
    images = IndexedImages([{"id": str(i), "image": ref} for i, ref in enumerate(refs)], {"split": "retrieval"})
    assert images.member("0") == ("000000000.jpg", samples[0]["jpg"]) and images.member("1") == ("000000002.jpg", samples[2]["jpg"])
    assert images.member("2") is None and images.member("3") is None and images.member("4") is None
    assert images.path("0") is None  # not a file to send as is
    samples[0]["jpg"] = b"\xff" * 50  # the shard rewritten a second later: read again
    write_webdataset_shard(shards, 0, samples)
    later = shard.stat().st_mtime + 1
    os.utime(shard, (later, later))
    assert images.member("0") == ("000000000.jpg", b"\xff" * 50)
    shard.write_bytes(shard.read_bytes()[:600])  # cut inside the first member's data
    assert images.member("0") is None


@pytest.mark.slow
def test_an_indexed_folder_with_a_link_out_of_it(served, invoke, searcher, tmp_path):
    """End to end: `cmhash index --images` follows links when it encodes, but the server still
    refuses to send a linked file that lies outside the folder."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    photos.mkdir()
    elsewhere.mkdir()
    sources = sorted(Path("stages/prepare/images").glob("*.png"))[:3]
    for path in sources[:2]:
        shutil.copy(path, photos / path.name)
    shutil.copy(sources[2], elsewhere / "private.png")
    (photos / "zz_link.png").symlink_to(elsewhere / "private.png")
    ok(invoke("index", "--images", photos, "--params", "params.yaml", "--out-dir", tmp_path / "photo_index"))
    app = TestClient(create_app(Searcher.load(tmp_path / "photo_index")))
    names = [Path(item["image"]).name for item in Searcher.load(tmp_path / "photo_index").index.items]
    assert names == [sources[0].name, sources[1].name, "zz_link.png"]
    assert app.get("/api/items/0/image").content == sources[0].read_bytes()
    assert app.get("/api/items/2/image").status_code == 404


# ---------------------------------------------------------------- bad input


def png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) around a few bytes of data: what a
    decompression bomb looks like before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.slow
def test_each_bad_query_is_a_4xx_json_error_and_the_server_goes_on(searcher):
    client = TestClient(create_app(searcher, Limits(max_upload_bytes=20_000, max_text_chars=200, max_k=50)), raise_server_exceptions=False)
    good_image = Path(searcher.index.items[0]["image"]).read_bytes()

    def upload(data: bytes, name: str = "q.png", **form):
        return client.post("/api/search", files={"image": (name, data, "image/png")}, data=form)

    bad = {
        "upload over the size limit": (upload(good_image + b"\0" * 30_000), 413, "over the limit of 20,000 bytes"),
        "body over the size limit (Content-Length)": (client.post("/api/search", content=b"x" * 100_000, headers={
            "content-type": "multipart/form-data; boundary=x"}), 413, "over the limit"),
        "JSON over its size limit": (client.post("/api/search", json={"text": "a" * 200_000}), 413, "over the limit"),
        "not an image": (upload(b"hello, not a picture", "notes.txt"), 415, "cannot read image notes.txt"),
        "an empty file": (upload(b""), 415, "cannot read image"),
        "a truncated image": (upload(good_image[: len(good_image) // 2]), 415, "cannot read image"),
        "a bomb past Pillow's limit": (upload(png(10_000, 10_000)), 413, "10000x10000 = 100,000,000 pixels"),
        "a bomb past twice Pillow's limit": (upload(png(40_000, 40_000)), 413, "too large to decode"),
        "an empty caption": (client.get("/api/search", params={"text": ""}), 400, "text is empty"),
        "a whitespace caption": (client.post("/api/search", json={"text": " \t\n "}), 400, "text is empty"),
        "a control-character caption": (client.get("/api/search", params={"text": "\x00\x07\x1b\u200b"}), 400, "text is empty"),
        "a caption over the length limit": (client.get("/api/search", params={"text": "a" * 201}), 400, "201 characters long; the limit is 200"),
        "k = 0": (client.get("/api/search", params={"text": "a ring", "k": 0}), 400, "k must be at least 1 (got 0)"),
        "k < 0": (client.post("/api/search", json={"text": "a ring", "k": -3}), 400, "k must be at least 1 (got -3)"),
        "k over the maximum": (client.get("/api/search", params={"text": "a ring", "k": 51}), 400, "k must be at most 50 (got 51)"),
        "k not a number": (client.get("/api/search", params={"text": "a ring", "k": "ten"}), 400, 'k must be a whole number (got "ten")'),
        "k a boolean": (client.post("/api/search", json={"text": "a ring", "k": True}), 400, "k must be a whole number (got true)"),
        "k a fraction on an upload": (upload(good_image, k="2.5"), 400, "k must be a whole number"),
        "k a list": (client.post("/api/search", json={"text": "a ring", "k": [5]}), 400, "k must be a whole number (got [5])"),
        "no caption": (client.get("/api/search"), 400, "give a caption"),
        "a caption that is not a string": (client.post("/api/search", json={"text": 123}), 400, "give a caption"),
        "invalid JSON": (client.post("/api/search", content=b"{text:", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        "JSON that is not an object": (client.post("/api/search", json=["a ring"]), 400, "must be an object"),
        "a form without the image": (client.post("/api/search", files={"photo": ("q.png", good_image)}), 400, "no file in an `image` field"),
        "two files": (client.post("/api/search", files=[("image", ("a.png", good_image)), ("image", ("b.png", good_image))]), 400,
                      "bad multipart form"),
        "another content type": (client.post("/api/search", content=b"a ring", headers={"content-type": "text/plain"}), 415, "not text/plain"),
    }
    for case, (answer, status, message) in bad.items():
        assert answer.status_code == status, (case, answer.text)
        assert message in answer.json()["error"], (case, answer.json())
        assert len(answer.json()["error"].splitlines()) == 1, case
    strict = TestClient(create_app(searcher, Limits(max_pixels=1000)))  # our own pixel limit, under Pillow's
    assert strict.post("/api/search", files={"image": ("q.png", good_image)}).status_code == 413

    assert client.get("/api/search", params={"text": "a red circle", "k": 50}).status_code == 200
    found = upload(good_image, k="3").json()
    assert found["searched"] == "text" and len(found["results"]) == 3
    assert client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_an_unexpected_failure_is_a_500_in_json(searcher, monkeypatch):
    broken = Searcher(searcher.index, searcher.index_dir, searcher.hash_model, searcher.encoder)
    monkeypatch.setattr(broken, "answer", lambda queries: 1 / 0)
    client = TestClient(create_app(broken), raise_server_exceptions=False)
    failed = client.get("/api/search", params={"text": "a ring"})
    assert failed.status_code == 500 and failed.json() == {"error": "internal error (ZeroDivisionError); see the server log"}
    assert client.get("/healthz").status_code == 200


@pytest.mark.slow
def test_a_query_the_index_cannot_answer(searcher, served, invoke, tmp_path):
    client = captions_only_client(invoke, tmp_path)
    refused = client.get("/api/search", params={"text": "a heart"})
    assert refused.status_code == 400 and "holds only text codes" in refused.json()["error"]
    assert client.get("/api/items/0/image").status_code == 404  # a captions index has no images
    with open(searcher.index.items[0]["image"], "rb") as f:
        assert len(client.post("/api/search", files={"image": ("q.png", f)}).json()["results"]) == 2


@pytest.mark.slow
def test_the_cli_refuses_the_same_queries_in_one_line(served, invoke, one_line_error, tmp_path):
    assert "--text is empty" in one_line_error(invoke("search", "--text", "\x07\x1b"))
    assert "limit is 1,000" in one_line_error(invoke("search", "--text", "a" * 1001))
    (tmp_path / "bomb.png").write_bytes(png(40_000, 40_000))
    assert "too large to decode" in one_line_error(invoke("search", "--image", tmp_path / "bomb.png"))
    (tmp_path / "big.png").write_bytes(png(10_000, 10_000))
    assert "100,000,000 pixels, over the limit" in one_line_error(invoke("search", "--image", tmp_path / "big.png"))


# ---------------------------------------------------------------- concurrency


@contextlib.contextmanager
def uvicorn_serving(app) -> Iterator[str]:
    """`app` under a real uvicorn in a thread of this process, on the socket `cmhash serve` makes."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def uvicorn_url(searcher) -> Iterator[str]:
    """The app (default batching) under a real uvicorn on 127.0.0.1 (an ephemeral port)."""
    with uvicorn_serving(create_app(searcher)) as url:
        yield url


@pytest.mark.slow
def test_concurrent_clients_each_get_their_own_answer(searcher, uvicorn_url):
    """8 clients at once, each a mix of caption and image queries, against a live server: every
    answer equals the one the searcher gives alone."""
    items = query_items()
    queries = [("text", item.caption) for item in items] + [("image", item.image) for item in items]
    with httpx.Client(base_url=uvicorn_url, timeout=60) as one:
        expected = {q: ask(one, *q) for q in queries}

    assert_concurrent_answers(uvicorn_url, queries, expected, clients=8, stride=3)


def assert_concurrent_answers(url: str, queries: list[tuple], expected: dict, clients: int, stride: int) -> None:
    """`clients` at once, each asking every query from its own offset: each answer is `expected`'s."""
    def client_run(offset: int) -> list[tuple]:
        with httpx.Client(base_url=url, timeout=60) as http:
            return [(q, ask(http, *q)) for q in queries[offset:] + queries[:offset]]

    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(client_run, range(0, clients * stride, stride)))
    assert sum(len(run) for run in runs) == clients * len(queries)
    for run in runs:
        for query, answer in run:
            assert answer == expected[query], query


def mixed_queries() -> list[tuple]:
    """Captions and images of the query split, and item queries of both targets, with several k."""
    items = query_items()
    return ([("text", item.caption, 7) for item in items] + [("text", item.caption, 3) for item in items[:5]]
            + [("image", item.image, 7) for item in items] + [("image", item.image, 12) for item in items[:5]]
            + [(f"similar-{target}", str(row), k) for row in range(0, 60, 6) for target, k in (("text", 7), ("image", 5))])


@pytest.mark.slow
def test_batched_answers_equal_unbatched_ones_under_concurrent_clients(searcher):
    """16 clients at once on a micro-batching server (batches up to 32, a 20 ms wait): every answer
    equals the unbatched server's, and the searcher's alone, query for query."""
    queries = mixed_queries()
    sizes: list[int] = []
    counting = Searcher(searcher.index, searcher.index_dir, searcher.hash_model, searcher.encoder)
    counting.answer = lambda batch: (sizes.append(len(batch)), searcher.answer(batch))[1]
    with uvicorn_serving(create_app(searcher, batching=Batching(1))) as url, httpx.Client(base_url=url, timeout=60) as one:
        expected = {q: ask(one, *q) for q in queries}
    for (_, query, k), answer in list(expected.items())[:4]:
        assert answer == counting.search_text(query, k)
    with uvicorn_serving(create_app(counting, batching=Batching(32, 20.0))) as url:
        assert_concurrent_answers(url, queries, expected, clients=16, stride=5)
    assert sum(sizes) == 4 + 16 * len(queries) and max(sizes) <= 32


def test_a_full_batch_goes_at_once_and_a_lone_query_is_answered():
    """Size 4 and a wait of 10 minutes: four queries are answered as one batch without waiting
    for the wait; a cancelled query is dropped from its batch; close() answers what is queued."""
    calls: list[list] = []

    class Echo:
        def answer(self, queries):
            calls.append(list(queries))
            return [{"echo": q} for q in queries]

    batcher = MicroBatcher(Echo(), size=4, wait_s=600)

    async def four() -> list:
        return await asyncio.gather(*(batcher.ask(q) for q in "abcd"))

    assert asyncio.run(four()) == [{"echo": q} for q in "abcd"] and calls == [list("abcd")]

    async def one_cancelled_then_one() -> dict:
        lost = asyncio.create_task(batcher.ask("lost"))
        await asyncio.sleep(0)
        lost.cancel()
        kept = asyncio.create_task(batcher.ask("kept"))
        await asyncio.sleep(0.05)
        batcher.close()  # the queued "kept" is answered before the worker stops
        return await kept

    assert asyncio.run(one_cancelled_then_one()) == {"echo": "kept"}
    assert calls[1] == ["kept"] and not batcher._thread.is_alive()


def test_a_fault_in_a_batch_reaches_each_of_its_clients():
    class Broken:
        def answer(self, queries):
            raise RuntimeError("the encoder broke")

    batcher = MicroBatcher(Broken(), size=2, wait_s=600)

    async def two() -> list:
        return await asyncio.gather(batcher.ask("a"), batcher.ask("b"), return_exceptions=True)

    assert [str(e) for e in asyncio.run(two())] == ["the encoder broke"] * 2
    batcher.close()


def test_batching_limits_are_checked():
    with pytest.raises(ConfigError, match="--batch must be at least 1"):
        Batching(0)
    with pytest.raises(ConfigError, match="--batch-wait-ms must be from 0 to 1000"):
        Batching(8, -1)


@pytest.mark.slow
def test_small_responses_are_not_held_back(uvicorn_url):
    """With Nagle's algorithm on, each response on a kept-alive connection waited for the client's
    delayed ACK: 40 ms for /healthz instead of 2."""
    with httpx.Client(base_url=uvicorn_url) as http:
        took = []
        for _ in range(21):
            start = time.perf_counter()
            http.get("/healthz")
            took.append(time.perf_counter() - start)
    assert sorted(took)[10] < 0.030


def ask(http: httpx.Client, modality: str, query: str, k: int = 7) -> dict:
    if modality == "text":
        answer = http.get("/api/search", params={"text": query, "k": k})
    elif modality == "image":
        with open(query, "rb") as f:
            answer = http.post("/api/search", files={"image": (Path(query).name, f)}, data={"k": str(k)})
    else:
        answer = http.get(f"/api/items/{query}/similar", params={"target": modality.removeprefix("similar-"), "k": k})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.mark.slow
def test_the_event_loop_answers_while_queries_encode(searcher, monkeypatch):
    """Searches run in worker threads: with three slow ones in flight, /healthz still answers at once."""
    slow = Searcher(searcher.index, searcher.index_dir, searcher.hash_model, searcher.encoder)
    monkeypatch.setattr(slow, "answer", lambda queries: (time.sleep(1.5), searcher.answer(queries))[1])
    app = create_app(slow)

    async def run() -> tuple[float, list]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cmhash") as http:
            searches = [asyncio.create_task(http.get("/api/search", params={"text": f"a ring {i}"})) for i in range(3)]
            await asyncio.sleep(0.2)
            start = time.perf_counter()
            health = await http.get("/healthz")
            waited = time.perf_counter() - start
            assert health.status_code == 200 and not any(task.done() for task in searches)
            return waited, await asyncio.gather(*searches)

    waited, answers = asyncio.run(run())
    assert waited < 0.5
    assert [a.status_code for a in answers] == [200, 200, 200]


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_the_serve_command(live_server):
    assert live_server.startswith("http://127.0.0.1:")  # the default: this machine only
    with httpx.Client(base_url=live_server, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/api/info").json()["count"] == 60
        assert http.get("/api/search", params={"text": ""}).status_code == 400
        assert len(http.get("/api/search", params={"text": "a blue ring", "k": 4}).json()["results"]) == 4


@pytest.mark.slow
def test_ctrl_c_exits_130_when_sigint_was_inherited_ignored(served):
    """A background job started from a script inherits SIGINT ignored; uvicorn still stops on it, and
    the command must still exit 130, not 0 (running_serve checks the code)."""
    with running_serve(served, sigint=signal.SIG_IGN) as url:
        assert httpx.get(f"{url}healthz", timeout=30).json() == {"status": "ok"}


def test_serve_errors_are_one_line(invoke, one_line_error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no index in nowhere" in one_line_error(invoke("serve", "--index-dir", "nowhere", "--port", 0))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(invoke("serve", "--port", port))
    assert "--port 70000" in one_line_error(invoke("serve", "--port", 70000))
    assert "--max-k must be at least 1" in one_line_error(invoke("serve", "--max-k", 0, "--port", 0))
    assert "--max-upload-mb must be above 0" in one_line_error(invoke("serve", "--max-upload-mb", 0))
    assert "--batch must be at least 1" in one_line_error(invoke("serve", "--batch", 0, "--port", 0))
    assert "--batch-wait-ms must be from 0 to 1000" in one_line_error(invoke("serve", "--batch-wait-ms", 5000, "--port", 0))


@pytest.mark.slow
def test_a_short_soak_has_no_5xx_and_bounded_memory(served, tmp_path):
    """benchmarks/soak_serve.py for 20 s: 16 clients, good and bad queries and uploads cut off
    midway; no 5xx, every answer the expected status, RSS growth under 10%, no traceback."""
    script = Path(__file__).parents[1] / "benchmarks" / "soak_serve.py"
    done = subprocess.run([sys.executable, str(script), "--index-dir", str(served), "--seconds", "20", "--json",
                           "--log", str(tmp_path / "server.log")], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout.splitlines()[-1])
    assert done.returncode == 0 and report["failed"] == [], (report, done.stderr)
    assert report["5xx"] == report["5xx_in_log"] == 0 and report["unexpected"] == {} and report["rss_growth"] < 0.10
    assert set(report["per_kind"]) == {"text", "image", "item", "oversized", "broken", "long caption", "bad k", "disconnect"}
    assert report["alive_at_end"] and report["exit_code"] == 130
