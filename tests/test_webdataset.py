"""`data.name: webdataset`: img2dataset's tar shards (built here with webdataset's TarWriter, with
bad members among them) read as streams: pairs, labels, the two ways of splitting and their
stability when shards are added, bad members under both `data.on_bad_item` policies, a shard that
cannot be opened, extraction from the tars (the same features as from the same images as files,
resumed tar by tar, shared out over ranks), and the whole pipeline on shards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cmhash.config.choices.datasets import WebDataset
from cmhash.data.datasets import build_collection
from cmhash.data.manifest import Item
from cmhash.data.tar_shards import split_member_ref
from cmhash.errors import DataError
from cmhash.features.clip import load_seeded_clip
from cmhash.features.encoding import Encoder
from cmhash.features.extraction import extract_pairs
from cmhash.features.shards import ShardStore
from cmhash.io import load_pickle
from fixtures_datasets import WEBDATASET_BAD, WEBDATASET_TAGS, make_webdataset, webdataset_key, write_webdataset_shard

ROWS = 20  # good pairs per shard


def collection(root: Path, **opts):
    return build_collection("webdataset", root, WebDataset(**opts), root / "out", 0)


@pytest.fixture
def shards(tmp_path) -> Path:
    make_webdataset(tmp_path / "shards")
    return tmp_path / "shards"


def test_pairs_labels_and_bad_members_named_by_shard_and_key(shards):
    c = collection(shards, label_field="tags")
    assert c.label_names == WEBDATASET_TAGS
    skipped = {s.id: (s.reason, Path(s.source).name) for s in c.skipped}
    assert skipped == {
        "000010021": ("empty caption", "00001.tar"),
        "000010022": ("no caption member", "00001.tar"),
        "000010023": ("unknown member extension 'xyz'", "00001.tar"),  # the member is left out...
        webdataset_key(2, ROWS - 1): ("truncated tar", "00002.tar"),  # the key the stream broke in
    }
    ids = [it.id for it in c.items]
    assert "000010023" in ids  # ...and its pair, whole without it, stays
    assert "000010020" in ids  # a corrupt image is found when extract decodes it
    assert len(ids) == 3 * ROWS + 2 - 1 and len(set(ids)) == len(ids)
    first = c.items[0]
    assert split_member_ref(first.image) == (str(shards / "00000.tar"), "000000000.jpg")
    assert (first.caption, first.labels) == ("a bird and a bird", (0,))  # tags [bird, bird]
    assert c.items[6].labels == (1, 2)  # row 6: tags [dog, car]
    assert not (shards / "out").exists()  # nothing unpacked


def test_no_label_field_is_an_unlabelled_collection(shards):
    c = collection(shards)
    assert c.label_names == [] and all(it.labels == () for it in c.items)
    assert len(c.items) == 3 * ROWS + 2 - 1  # no pair is lost for want of a label


def test_class_ids_and_a_missing_field(tmp_path):
    samples = []
    for row, label in enumerate([3, 10, 3, None, "x"]):
        meta = {"key": str(row)} if label is None else {"key": str(row), "cls": label}
        samples.append({"__key__": f"{row:09d}", "jpg": b"\xff\xd8", "txt": "a caption", "json": json.dumps(meta)})
    write_webdataset_shard(tmp_path, 0, samples)
    c = collection(tmp_path, label_field="cls")
    assert c.label_names == ["3", "10", "x"]  # class ids by number, before names
    assert [it.labels for it in c.items] == [(0,), (1,), (0,), (2,)]
    assert [(s.id, s.reason) for s in c.skipped] == [("000000003", "no label")]


def split_of(c) -> dict[str, str]:
    """Each pair's id -> the one of query / val / train / retrieval-only it falls in."""
    role = {}
    for split in ("retrieval", "train", "val", "query"):  # the narrower split wins
        for row in c.splits[split]:
            role[c.items[row].id] = split
    return role


def test_hash_splits_follow_the_fractions_and_stay_put_when_a_shard_is_added(tmp_path):
    opts = {"query_fraction": 0.2, "val_fraction": 0.1, "train_fraction": 0.7}
    for shard in range(6):
        write_webdataset_shard(tmp_path / "a", shard, [_sample(shard, row) for row in range(50)])
    before = collection(tmp_path / "a", **opts)
    write_webdataset_shard(tmp_path / "a", 6, [_sample(6, row) for row in range(50)])
    after = collection(tmp_path / "a", **opts)
    old, new = split_of(before), split_of(after)
    assert len(old) == 300 and len(new) == 350
    assert {key: new[key] for key in old} == old  # no key moved
    # the protocol: query and retrieval partition the pairs; train and val are disjoint parts of retrieval
    s = after.splits
    assert sorted(s["query"] + s["retrieval"]) == list(range(350))
    assert not set(s["train"]) & set(s["val"]) and set(s["train"]) | set(s["val"]) <= set(s["retrieval"])
    shares = {split: len(rows) / 350 for split, rows in s.items()}
    assert shares["query"] == pytest.approx(0.2, abs=0.06) and shares["val"] == pytest.approx(0.1, abs=0.05)
    assert shares["train"] == pytest.approx(0.7 * 0.7, abs=0.08)  # of the 70% in neither
    other_seed = build_collection("webdataset", tmp_path / "a", WebDataset(**opts), tmp_path / "out", 1)
    assert split_of(other_seed) != new  # the seed draws another split


def _sample(shard: int, row: int) -> dict:
    key = webdataset_key(shard, row)
    return {"__key__": key, "jpg": b"\xff\xd8", "txt": f"caption {key}", "json": json.dumps({"key": key})}


def test_shard_splits_and_a_shard_name_not_in_the_root(shards):
    role = split_of(collection(shards, query_shards=["00002.tar"], val_shards=["00000.tar"]))
    assert {r for key, r in role.items() if key.startswith("00002")} == {"query"}
    assert {r for key, r in role.items() if key.startswith("00000")} == {"val"}
    assert {r for key, r in role.items() if key.startswith("00001")} == {"train"}  # train_fraction 1: all the rest
    # query by shard, val carved by key hash from the other shards
    mixed = split_of(collection(shards, query_shards=["00002.tar"], val_fraction=0.3))
    assert {r for key, r in mixed.items() if key.startswith("00002")} == {"query"}
    assert {r for key, r in mixed.items() if not key.startswith("00002")} == {"val", "train"}
    with pytest.raises(DataError, match=r"^data.webdataset.val_shards: 00009.tar is not among the shards of data.root$"):
        collection(shards, query_shards=["00002.tar"], val_shards=["00009.tar"])


def test_a_brace_pattern_names_the_shards(shards):
    c = collection(Path(f"{shards}/{{00000..00001}}.tar"))
    assert {Path(split_member_ref(it.image)[0]).name for it in c.items} == {"00000.tar", "00001.tar"}


# ------------------------------------------------------------------ through the CLI


@pytest.fixture
def project(params, params_file, shards) -> dict:
    params["data"].update(name="webdataset", root=str(shards))
    params["data"]["webdataset"].update(label_field="tags", query_fraction=0.2, val_fraction=0.15)
    params["clip"].update(batch_size=8, num_workers=2)
    params_file.write_text(yaml.safe_dump(params))
    return params


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive" * 40], ids=["empty", "not-a-tar"])
def test_a_shard_that_cannot_be_opened_is_one_line_naming_it(project, params_file, shards, invoke, one_line_error, content):
    (shards / "00003.tar").write_bytes(content)
    line = one_line_error(invoke("prepare", "--params", params_file))
    assert line.startswith(f"error: cannot open shard {shards / '00003.tar'}: ReadError")
    assert not Path("stages/prepare").exists()


def test_a_missing_shard_of_a_pattern_is_one_line_naming_it(project, params, params_file, shards, invoke, one_line_error):
    params["data"]["root"] = f"{shards}/{{00000..00004}}.tar"
    params_file.write_text(yaml.safe_dump(params))
    assert one_line_error(invoke("prepare", "--params", params_file)).startswith(f"error: cannot open shard {shards / '00003.tar'}: ")


def test_fail_on_a_bad_member_names_its_shard_and_key(project, params, params_file, shards, invoke, one_line_error):
    params["data"]["on_bad_item"] = "fail"
    params_file.write_text(yaml.safe_dump(params))
    line = one_line_error(invoke("prepare", "--params", params_file))
    assert line == f"error: 4 bad item(s), first: 000010021 in {shards / '00001.tar'}: empty caption (or set data.on_bad_item: skip)"


def test_fail_on_a_corrupt_image_names_its_shard_and_key(project, params, params_file, shards, invoke):
    (shards / "00002.tar").unlink()  # the truncated one
    assert invoke("prepare", "--params", params_file).exit_code == 0
    rows = [json.loads(line) for line in Path("stages/prepare/skipped.jsonl").read_text().splitlines()]
    assert {(r["id"], r["source"]) for r in rows} == {(key, str(shards / "00001.tar")) for key in list(WEBDATASET_BAD)[1:]}
    params["data"]["on_bad_item"] = "fail"
    params_file.write_text(yaml.safe_dump(params))
    result = invoke("extract", "--params", params_file)
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]  # after the random-weights warning
    assert line.startswith(f"error: bad image 000010020 in {shards / '00001.tar'}: unreadable image: UnidentifiedImageError")


@pytest.mark.slow
def test_shards_go_through_the_whole_pipeline(project, params_file, shards, invoke):
    for command in ("prepare", "extract", "train-fusion", "train-hash", "evaluate"):
        result = invoke(command, "--params", params_file)
        assert result.exit_code == 0, f"{command}: {result.output}"
    assert "MAP, strict protocol" in result.output
    skipped = [json.loads(line) for line in Path("stages/extract/skipped.jsonl").read_text().splitlines()]
    assert [(r["id"], r["image"]) for r in skipped] == [("000010020", f"{shards / '00001.tar'}#000010020.jpg")]
    info = json.loads(Path("metrics/evaluate.json").read_text())
    prepared = {split: sum(1 for _ in open(f"stages/prepare/{split}.jsonl")) for split in ("query", "retrieval")}
    corrupt_in = "query" if "000010020" in Path("stages/prepare/query.jsonl").read_text() else "retrieval"
    prepared[corrupt_in] -= 1
    assert info["items"] == prepared
    assert not list(shards.parent.rglob("*.jpg"))  # nothing unpacked
    # searchable: an index of the retrieval split, whose images the server reads from their shards
    assert invoke("index", "--params", params_file, "--split", "retrieval").exit_code == 0
    from fastapi.testclient import TestClient

    from cmhash.search.engine import Searcher
    from cmhash.serve.app import create_app

    searcher = Searcher.load(Path("stages/index"))
    first = searcher.index.items[0]["image"]
    answer = TestClient(create_app(searcher)).get("/api/items/0/image")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.content == _member_bytes(*split_member_ref(first))


# ------------------------------------------------------------------ extraction from the tars


@pytest.fixture(scope="module")
def clip():
    return load_seeded_clip("cmhash-tiny", "none", 0, torch.device("cpu"))


def tar_and_file_items(shards: Path) -> tuple[list[Item], list[Item]]:
    """The good pairs as members of the shards, and the same images written out as files."""
    c = collection(shards)
    as_files = []
    for item in c.items:
        shard, member = split_member_ref(item.image)
        path = shards.parent / "files" / member
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_member_bytes(shard, member))
        as_files.append(Item(item.id, str(path), item.caption, item.labels))
    return c.items, as_files


def _member_bytes(shard: str, member: str) -> bytes:
    import tarfile

    with tarfile.open(shard) as tar:
        return tar.extractfile(member).read()


def test_tar_members_give_the_features_of_the_same_images_as_files(tmp_path, clip, caplog):
    for shard in range(3):
        write_webdataset_shard(tmp_path / "shards", shard, [_coloured(shard, row) for row in range(7)])
    tar_items, file_items = tar_and_file_items(tmp_path / "shards")
    encoder = Encoder(clip, torch.device("cpu"), batch_size=3, num_workers=2)  # shards read by two workers at once
    from_tar = extract_pairs(encoder, tar_items, 4, ShardStore(tmp_path / "tar_work"), "key")
    from_files = extract_pairs(encoder, file_items, 4, ShardStore(tmp_path / "file_work"), "key")
    assert from_tar.shards == 3 and from_files.shards == 6  # one per tar shard; clip.shard_size pairs per file shard
    assert from_tar.ok.all() and not from_tar.skipped
    np.testing.assert_array_equal(from_tar.image, from_files.image)
    np.testing.assert_array_equal(from_tar.text, from_files.text)

    # resumed tar by tar: a re-run reuses the three, and a shard added later is the only one encoded
    caplog.set_level(logging.INFO, logger="cmhash")
    again = extract_pairs(encoder, tar_items, 4, ShardStore(tmp_path / "tar_work"), "key")
    assert (again.reused, again.encoded_pairs) == (3, 0)
    np.testing.assert_array_equal(again.image, from_tar.image)
    write_webdataset_shard(tmp_path / "shards", 3, [_coloured(3, row) for row in range(5)])
    grown = collection(tmp_path / "shards").items
    more = extract_pairs(encoder, grown, 4, ShardStore(tmp_path / "tar_work"), "key")
    assert (more.reused, more.encoded_pairs) == (3, 5)


def _coloured(shard: int, row: int) -> dict:
    sample = _sample(shard, row)
    from fixtures_datasets import _coloured_jpeg

    return {**sample, "jpg": _coloured_jpeg(shard * 7 + row)}


def test_a_shard_damaged_after_prepare_skips_what_it_lost(tmp_path, clip):
    write_webdataset_shard(tmp_path / "shards", 0, [_coloured(0, row) for row in range(6)])
    items = collection(tmp_path / "shards").items
    path = tmp_path / "shards" / "00000.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    encoded = extract_pairs(Encoder(clip, torch.device("cpu"), 4), items, 4, ShardStore(tmp_path / "work"), "key")
    lost = encoded.skipped
    assert 0 < len(lost) < 6 and encoded.ok.sum() == 6 - len(lost)
    assert all(s.reason.startswith(f"not read from {path}: ReadError") for s in lost)


def test_ranks_share_the_tar_shards_and_rank_0_assembles_them(project, params, tmp_path, monkeypatch):
    from cmhash.config.schema import parse_params
    from cmhash.config.stages import ExtractSettings, PrepareSettings
    from cmhash.pipeline import extract, prepare

    p = parse_params(params)
    prepare.run(PrepareSettings.of(p), tmp_path / "prepare")
    run = lambda out: extract.run(ExtractSettings.of(p), tmp_path / "prepare", tmp_path / out, tmp_path / f"{out}.json")  # noqa: E731
    run("one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # tar shard 1 of 0, 1, 2
    run("two")
    assert {tuple(sorted({i[:5] for i in load_pickle(f)["ids"]})) for f in (tmp_path / "two_shards").glob("*.pkl")} == {("00001",)}
    monkeypatch.setenv("RANK", "0")  # shards 0 and 2, then every one
    run("two")
    for split in ("train", "val", "query", "retrieval"):
        assert (tmp_path / "two" / f"{split}.pkl").read_bytes() == (tmp_path / "one" / f"{split}.pkl").read_bytes()
