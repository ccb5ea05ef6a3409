"""Importers on miniature copies of the real download layouts (tests/fixtures_datasets.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmhash.config.choices.datasets import DATASETS, Splits
from cmhash.config.schema import parse_params
from cmhash.data.datasets import build_collection, detect_layouts
from cmhash.data.manifest import Collection
from cmhash.errors import ConfigError, DataError
from fixtures_datasets import (
    COCO_IMAGES,
    MIRFLICKR_CONCEPTS,
    coco_file_name,
    make_coco,
    make_mirflickr,
    make_nuswide,
    write,
    write_jpeg,
)


def build(name: str, root: Path, opts: dict | None = None, seed: int = 0) -> Collection:
    """The importer `name` with `opts` as its data.<name> section (the rest defaulted)."""
    return build_collection(name, root, DATASETS.entry(name).knobs.model_validate(opts or {}), root / "out", seed)


def option_error(name: str, opts: dict) -> str:
    """The one-line error params.yaml gets for `data.<name>: opts`."""
    with pytest.raises(ConfigError) as err:
        parse_params({"data": {"name": name, name: opts}})
    assert "\n" not in str(err.value)
    return str(err.value)


def by_id(collection: Collection) -> dict:
    return {item.id: item for item in collection.items}


def label_sets(collection: Collection) -> dict[str, set[str]]:
    return {item.id: {collection.label_names[i] for i in item.labels} for item in collection.items}


def skipped(collection: Collection) -> dict[str, str]:
    return {s.id: s.reason for s in collection.skipped}


# --- registry -------------------------------------------------------------------------------


def test_registry_names_and_unknown_name(tmp_path):
    assert DATASETS.names() == ["coco", "demo", "features", "manifest", "mirflickr", "nuswide", "webdataset"]
    with pytest.raises(ConfigError) as exc:
        build_collection("flickr30k", tmp_path, Splits(query=1, train=1, val=1), tmp_path / "out", 0)
    assert str(exc.value) == "unknown dataset 'flickr30k'; choose one of: coco, demo, features, manifest, mirflickr, nuswide, webdataset"
    with pytest.raises(ConfigError) as exc:
        parse_params({"data": {"name": "flickr30k"}})
    assert str(exc.value).endswith(
        "data.name = 'flickr30k': unknown dataset 'flickr30k'; choose one of: coco, demo, features, manifest, mirflickr, nuswide, webdataset")


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_importer_resolves(name):
    entry = DATASETS.entry(name)
    assert callable(entry.load())
    # every dataset of images has the split sizes; precomputed features take theirs from the files,
    # and a dataset that carves its own splits (webdataset) takes none
    assert issubclass(entry.knobs, Splits) != bool(entry.meta.get("precomputed") or entry.meta.get("own_splits")), name


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("mirflickr", (2000, 5000, 1000)), ("nuswide", (2100, 10500, 1000)), ("coco", (5000, 10000, 1000))],
)
def test_split_size_defaults_follow_the_field(name, sizes):
    opts = DATASETS.entry(name).knobs()
    assert (opts.query, opts.train, opts.val) == sizes
    assert DATASETS.entry(name).knobs(query=7).query == 7
    assert parse_params({"data": {"name": name}}).data.options.query == sizes[0]


def test_unknown_option_is_a_config_error():
    assert option_error("mirflickr", {"qurey": 10}).endswith("unknown key data.mirflickr.qurey; did you mean data.mirflickr.query?")


# --- MIRFlickr-25K --------------------------------------------------------------------------


def test_mirflickr_items_labels_captions_and_skips(tmp_path):
    make_mirflickr(tmp_path)
    c = build("mirflickr", tmp_path)
    assert c.dataset == "mirflickr"
    assert c.label_names == sorted(MIRFLICKR_CONCEPTS) and len(c.label_names) == 24
    assert [i.id for i in c.items] == ["1", "2", "6"]
    assert label_sets(c) == {"1": {"sky", "clouds"}, "2": {"sky", "animals", "dog"}, "6": {"people", "portrait", "female"}}
    assert {i.id: i.caption for i in c.items} == {"1": "sky blue", "2": "dog sky", "6": "people portrait"}
    assert by_id(c)["1"].image == str(tmp_path / "mirflickr" / "im1.jpg")
    assert skipped(c) == {"3": "empty caption", "4": "no label", "5": "image file missing", "7": "tags file missing"}


def test_mirflickr_min_tag_count_drops_rare_tags(tmp_path):
    make_mirflickr(tmp_path)
    c = build("mirflickr", tmp_path, {"min_tag_count": 2})  # only "sky" is on two images
    assert {i.id: i.caption for i in c.items} == {"1": "sky", "2": "sky"}
    assert skipped(c)["6"] == "empty caption"


def test_mirflickr_keeps_a_relative_root_relative(tmp_path, monkeypatch):
    make_mirflickr(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    c = build("mirflickr", Path("data"))
    assert by_id(c)["1"].image == str(Path("data/mirflickr/im1.jpg"))


def test_mirflickr_missing_root_and_annotation_file(tmp_path):
    with pytest.raises(DataError, match="dataset root not found: .*nowhere"):
        build("mirflickr", tmp_path / "nowhere")
    make_mirflickr(tmp_path)
    (tmp_path / "mirflickr25k_annotations_v080" / "water.txt").unlink()
    with pytest.raises(DataError) as exc:
        build("mirflickr", tmp_path)
    assert "annotation file not found" in str(exc.value)
    assert str(tmp_path / "mirflickr25k_annotations_v080" / "water.txt") in str(exc.value)
    assert "\n" not in str(exc.value)


def test_mirflickr_missing_tag_folder_names_it(tmp_path):
    make_mirflickr(tmp_path)
    for f in (tmp_path / "mirflickr" / "meta" / "tags").iterdir():
        f.unlink()
    (tmp_path / "mirflickr" / "meta" / "tags").rmdir()
    with pytest.raises(DataError, match=f"tag folder not found: {tmp_path / 'mirflickr' / 'meta' / 'tags'}"):
        build("mirflickr", tmp_path)


def test_a_root_in_another_datasets_layout_says_which(tmp_path):
    make_coco(tmp_path)
    with pytest.raises(DataError, match=r"MIRFlickr-25K image folder not found: .*looks like the coco layout \(set data.name: coco\)"):
        build("mirflickr", tmp_path)
    assert detect_layouts(tmp_path) == ["coco"]


# --- NUS-WIDE -------------------------------------------------------------------------------


def test_nuswide_keeps_the_ten_most_frequent_concepts(tmp_path):
    make_nuswide(tmp_path)
    c = build("nuswide", tmp_path)
    # counts: sky 6, clouds 5, person 4, water 4, animal 3, grass 3, buildings/plants/window 2,
    # then airport, beach, lake with 1 each: the name breaks the tie for the last place.
    assert c.label_names == ["airport", "animal", "buildings", "clouds", "grass", "person", "plants", "sky", "water", "window"]
    assert [i.id for i in c.items] == ["actor/0001_1001", "dog/0001_1005", "dog/0002_1006", "house/0001_1007"]
    assert label_sets(c) == {
        "actor/0001_1001": {"person", "sky", "clouds"},
        "dog/0001_1005": {"animal", "grass", "sky", "clouds", "water"},
        "dog/0002_1006": {"animal", "grass", "person", "plants", "window", "buildings", "sky"},
        "house/0001_1007": {"buildings", "window", "plants", "person", "water", "sky", "clouds", "airport"},
    }
    assert [i.caption for i in c.items] == ["man portrait", "dog grass", "puppy", "house"]
    # A full Windows path in the image list maps to the same place as the short form.
    assert by_id(c)["house/0001_1007"].image == str(tmp_path / "Flickr" / "house" / "0001_1007.jpg")
    assert skipped(c) == {
        "actor/0002_1002": "empty caption",
        "beach/0001_1003": "no label",
        "beach/0002_1004": "image file missing",
        "house/0002_1008": "tag line is for another image",
    }


def test_nuswide_top_concepts_option(tmp_path):
    make_nuswide(tmp_path)
    c = build("nuswide", tmp_path, {"top_concepts": 3})  # sky 6, clouds 5, then person beats water by name
    assert c.label_names == ["clouds", "person", "sky"]
    assert label_sets(c)["dog/0001_1005"] == {"sky", "clouds"}
    with pytest.raises(ConfigError, match=r"^data.nuswide.top_concepts is 13, but Groundtruth/AllLabels has only 12 concepts$"):
        build("nuswide", tmp_path, {"top_concepts": 13})
    assert "data.nuswide.top_concepts = 0" in option_error("nuswide", {"top_concepts": 0})


def test_nuswide_missing_files_and_misaligned_lists(tmp_path):
    make_nuswide(tmp_path)
    tags = tmp_path / "NUS_WID_Tags" / "All_Tags.txt"
    tags.rename(tmp_path / "All_Tags.txt")
    with pytest.raises(DataError, match=f"NUS-WIDE tag file not found: {tags}"):
        build("nuswide", tmp_path)
    (tmp_path / "All_Tags.txt").rename(tags)
    with (tmp_path / "Groundtruth" / "AllLabels" / "Labels_sky.txt").open("a") as f:
        f.write("1\r\n")
    with pytest.raises(DataError, match=r"Labels_sky.txt has 9 lines but ImageList/Imagelist.txt has 8"):
        build("nuswide", tmp_path)


# --- MS-COCO 2014 ---------------------------------------------------------------------------


def test_coco_items_labels_captions_and_skips(tmp_path):
    make_coco(tmp_path)
    c = build("coco", tmp_path, {"caption": "first"})
    assert c.label_names == ["person", "bicycle", "car", "dog"]  # category-id order: 1, 2, 3, 18
    assert [i.id for i in c.items] == ["9", "73", "74"]
    assert label_sets(c) == {"9": {"dog", "person"}, "73": {"person", "car"}, "74": {"dog"}}
    # `first` = the lowest annotation id, whitespace collapsed
    assert {i.id: i.caption for i in c.items} == {"9": "A person with a dog", "73": "first", "74": "a dog"}
    assert by_id(c)["73"].image == str(tmp_path / "val2014" / coco_file_name("val2014", 73))
    assert skipped(c) == {"25": "no label", "30": "empty caption", "42": "image file missing"}


def test_coco_keeps_every_caption_grouped_by_image_by_default(tmp_path):
    make_coco(tmp_path)
    c = build("coco", tmp_path)
    # one pair per caption in annotation-id order, each naming its image
    assert [(i.id, i.group, i.caption) for i in c.items] == [
        ("9/12", "9", "A person with a dog"), ("9/50", "9", "A man walking a dog."),
        ("73/7", "73", "first"), ("73/8", "73", "second"), ("73/9", "73", "third"), ("74/10", "74", "a dog")]
    assert by_id(c)["73/8"].image == by_id(c)["73/9"].image == str(tmp_path / "val2014" / coco_file_name("val2014", 73))
    assert label_sets(c)["9/50"] == {"dog", "person"}
    assert skipped(c) == {"25/3": "no label", "30": "empty caption", "42/5": "image file missing"}


def test_coco_random_caption_is_seeded(tmp_path):
    make_coco(tmp_path)
    texts = {seed: by_id(build("coco", tmp_path, {"caption": "random"}, seed=seed))["73"].caption for seed in range(12)}
    assert set(texts.values()) <= {"first", "second", "third"}
    assert len(set(texts.values())) > 1  # 12 seeds all picking the same of 3: chance 3 / 3**12
    assert by_id(build("coco", tmp_path, {"caption": "random"}, seed=5))["73"].caption == texts[5]
    assert "data.coco.caption = 'longest': input should be 'all', 'first' or 'random'" in option_error("coco", {"caption": "longest"})


def test_coco_missing_and_corrupt_annotation_files(tmp_path):
    make_coco(tmp_path)
    instances = tmp_path / "annotations" / "instances_val2014.json"
    text = instances.read_text()
    instances.unlink()
    with pytest.raises(DataError, match=f"COCO instance file not found: {instances}"):
        build("coco", tmp_path)
    instances.write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match="instances_val2014.json is not valid JSON"):
        build("coco", tmp_path)
    instances.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="instances_val2014.json is not a COCO 2014 annotation file.*categories"):
        build("coco", tmp_path)


def test_coco_ids_are_image_ids(tmp_path):
    make_coco(tmp_path)
    ids = [str(i) for i in sorted(COCO_IMAGES)]
    c = build("coco", tmp_path, {"caption": "first"})  # one pair per image (the default `all` ids pairs <image>/<annotation>)
    assert sorted([i.id for i in c.items] + [s.id for s in c.skipped], key=int) == ids


# --- generic manifest -----------------------------------------------------------------------


def test_manifest_jsonl(tmp_path):
    for name in ("a", "b", "c"):
        write_jpeg(tmp_path / "sub" / "img" / f"{name}.jpg")
    absolute = tmp_path / "elsewhere" / "d.jpg"
    write_jpeg(absolute)
    lines = [
        {"image": "img/a.jpg", "caption": "a dog\non a beach", "labels": ["dog", "beach"]},
        {"id": "x", "image": "img/b.jpg", "caption": " ", "labels": ["cat"]},
        "{not json",
        {"image": "img/missing.jpg", "caption": "gone", "labels": ["cat"]},
        {"image": "img/c.jpg", "caption": "nothing", "labels": []},
        {"id": "x", "image": "img/c.jpg", "caption": "again", "labels": ["cat"]},
        {"id": 7, "image": str(absolute), "caption": "far away", "labels": ["cat", 3]},
        {"image": "img/a.jpg", "labels": ["dog"]},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    write(tmp_path / "sub" / "pairs.jsonl", text.replace("\n{not", "\n\n{not"))  # a blank line is not a record
    c = build("manifest", tmp_path, {"path": "sub/pairs.jsonl"})
    assert c.label_names == ["3", "beach", "cat", "dog"]
    assert [(i.id, i.caption) for i in c.items] == [("1", "a dog on a beach"), ("7", "far away")]
    assert label_sets(c) == {"1": {"dog", "beach"}, "7": {"cat", "3"}}
    assert by_id(c)["1"].image == str(tmp_path / "sub" / "img" / "a.jpg")
    assert by_id(c)["7"].image == str(absolute)
    assert skipped(c) == {"x": "duplicate id", "3": "not a JSON object", "4": "image file missing", "5": "no label",
                          "8": "missing key 'caption'"}  # fmt: skip
    assert [s.reason for s in c.skipped if s.id == "x"] == ["empty caption", "duplicate id"]


def test_manifest_csv_with_separator_and_given_label_names(tmp_path):
    write_jpeg(tmp_path / "a.jpg")
    write_jpeg(tmp_path / "b.jpg")
    write(
        tmp_path / "pairs.csv",
        '\ufeffid,image,caption,labels\r\nA,a.jpg,"a dog, running",dog; beach\r\nB,b.jpg,a bird,bird\r\n,b.jpg,again,\r\n',
    )
    opts = {"path": "pairs.csv", "separator": ";", "label_names": ["dog", "beach", "cat"]}
    c = build("manifest", tmp_path, opts)
    assert c.label_names == ["dog", "beach", "cat"]
    assert [(i.id, i.caption, i.labels) for i in c.items] == [("A", "a dog, running", (0, 1))]
    assert skipped(c) == {"B": "unknown label 'bird'", "3": "no label"}


def test_manifest_bad_files(tmp_path):
    with pytest.raises(DataError, match=f"manifest file not found: {tmp_path / 'manifest.jsonl'}"):
        build("manifest", tmp_path)
    write(tmp_path / "pairs.csv", "image,text\nx.jpg,hello\n")
    with pytest.raises(DataError, match="pairs.csv lacks column\\(s\\) caption, labels"):
        build("manifest", tmp_path, {"path": "pairs.csv"})
    with pytest.raises(ConfigError, match=r"must end in one of \.csv, \.jsonl"):
        build("manifest", tmp_path, {"path": "pairs.txt"})
    assert "data.manifest.label_names = 'dog'" in option_error("manifest", {"path": "pairs.csv", "label_names": "dog"})
    assert "data.manifest.label_names = ['dog', 'cat', 'dog']: must be null or a list of distinct strings" in option_error(
        "manifest", {"label_names": ["dog", "cat", "dog"]})


# --- prepare: splits, the bad-item policy, one-line errors -----------------------------------


def _manifest_collection(root: Path, n: int, bad: dict[int, str] | None = None) -> None:
    """n JSONL pairs p0..p{n-1} with JPEGs; `bad` maps a row to "caption" (empty) or "label" (none)."""
    rows = []
    for k in range(n):
        write_jpeg(root / "img" / f"{k}.jpg")
        rows.append({"id": f"p{k}", "image": f"img/{k}.jpg", "caption": f"pair {k}", "labels": ["odd" if k % 2 else "even"]})
    for k, what in (bad or {}).items():
        rows[k]["caption" if what == "caption" else "labels"] = " " if what == "caption" else []
    write(root / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _run_prepare(params: dict, out: Path):
    from cmhash.config.stages import PrepareSettings
    from cmhash.pipeline import prepare

    p = parse_params(params)
    return prepare.run(PrepareSettings.of(p), out)


def _prepare(params, root: Path, out: Path, **sizes):
    params["data"].update(name="manifest", root=str(root))
    params["data"]["manifest"] = {"path": "pairs.jsonl", **sizes}
    return _run_prepare(params, out)


def test_prepare_splits_follow_params_are_seeded_and_identical_across_runs(params, tmp_path):
    _manifest_collection(tmp_path / "c", 30)
    sizes = {"query": 6, "train": 15, "val": 4}
    counts = _prepare(params, tmp_path / "c", tmp_path / "a", **sizes)
    assert counts == {"query": 6, "retrieval": 24, "train": 15, "val": 4}
    _prepare(params, tmp_path / "c", tmp_path / "b", **sizes)
    for name in ("query.jsonl", "retrieval.jsonl", "train.jsonl", "val.jsonl", "labels.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ids = {s: [json.loads(line)["id"] for line in (tmp_path / "a" / f"{s}.jsonl").read_text().splitlines()]
           for s in ("query", "retrieval", "train", "val")}  # fmt: skip
    assert sorted(ids["query"] + ids["retrieval"], key=lambda i: int(i[1:])) == [f"p{k}" for k in range(30)]
    assert set(ids["train"]) | set(ids["val"]) <= set(ids["retrieval"]) and not set(ids["train"]) & set(ids["val"])
    params["seed"] += 1
    _prepare(params, tmp_path / "c", tmp_path / "d", **sizes)
    assert (tmp_path / "d" / "query.jsonl").read_bytes() != (tmp_path / "a" / "query.jsonl").read_bytes()


def test_prepare_bad_item_policy_skip_reports_and_fail_stops(params, tmp_path, caplog):
    make_mirflickr(tmp_path / "mf")
    params["data"].update(name="mirflickr", root=str(tmp_path / "mf"), on_bad_item="skip")
    params["data"]["mirflickr"].update(query=1, train=1, val=1)

    with caplog.at_level("WARNING", logger="cmhash"):
        _run_prepare(params, tmp_path / "out")
    report = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in report} == {
        "3": "empty caption", "4": "no label", "5": "image file missing", "7": "tags file missing"}  # fmt: skip
    assert "skipped 4 item(s)" in caplog.text

    params["data"]["on_bad_item"] = "fail"
    with pytest.raises(DataError, match=r"^3 bad item\(s\), first: 3: empty caption \(or set data.on_bad_item: skip\)$"):
        _run_prepare(params, tmp_path / "failed")
    assert not (tmp_path / "failed" / "query.jsonl").exists()


def test_pairs_without_a_label_are_not_bad_items(params, tmp_path):
    _manifest_collection(tmp_path / "c", 12, bad={4: "label"})
    params["data"]["on_bad_item"] = "fail"
    counts = _prepare(params, tmp_path / "c", tmp_path / "out", query=3, train=6, val=2)
    assert counts["query"] + counts["retrieval"] == 11
    assert (tmp_path / "out" / "skipped.jsonl").read_text() == '{"id": "p4", "reason": "no label"}\n'
    _manifest_collection(tmp_path / "c", 12, bad={4: "caption"})
    with pytest.raises(DataError, match="p4: empty caption"):
        _prepare(params, tmp_path / "c", tmp_path / "out2", query=3, train=6, val=2)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mirflickr", "mirflickr"), ("nuswide", "ImageList/Imagelist.txt"), ("coco", "annotations/captions_train2014.json")],
)
def test_missing_layout_is_one_line_naming_the_expected_path(params, params_file, tmp_path, invoke, one_line_error, name, expected):
    import yaml

    params["data"].update(name=name, root=str(tmp_path / "nowhere"))
    params_file.write_text(yaml.safe_dump(params))
    assert f"dataset root not found: {tmp_path / 'nowhere'}" in one_line_error(invoke("prepare", "--params", params_file))
    (tmp_path / "nowhere").mkdir()  # a root, but not in the dataset's layout
    line = one_line_error(invoke("prepare", "--params", params_file))
    assert f"not found: {tmp_path / 'nowhere' / expected}" in line
