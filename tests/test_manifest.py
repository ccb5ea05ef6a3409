import numpy as np
import pytest

from cmhash.data.manifest import Item, make_splits, multi_hot, read_split, write_split
from cmhash.errors import DataError


def test_splits_follow_the_protocol():
    s = make_splits(100, query=20, train=50, val=10, seed=1)
    assert len(s["query"]) == 20 and len(s["retrieval"]) == 80 and len(s["train"]) == 50 and len(s["val"]) == 10
    assert not set(s["query"]) & set(s["retrieval"])  # query and database are disjoint
    assert set(s["query"]) | set(s["retrieval"]) == set(range(100))
    assert set(s["train"]) <= set(s["retrieval"]) and set(s["val"]) <= set(s["retrieval"])
    assert not set(s["train"]) & set(s["val"]) and not set(s["val"]) & set(s["query"])


def test_splits_are_seeded():
    a, b, c = (make_splits(50, query=10, train=20, val=5, seed=seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["query"], c["query"])


def test_splits_too_large_is_a_clear_error():
    with pytest.raises(DataError, match="exceed the 10 usable pairs"):
        make_splits(10, query=5, train=5, val=1, seed=0)


def test_manifest_round_trip_and_multi_hot(tmp_path):
    items = [Item("a", "img/a.png", "a red circle", (0, 2)), Item("b", "/abs/b.jpg", "ünïcode caption", (1,))]
    write_split(tmp_path / "s.jsonl", items)
    assert read_split(tmp_path / "s.jsonl") == items
    np.testing.assert_array_equal(multi_hot(items, 3), [[1, 0, 1], [0, 1, 0]])


def test_bad_manifest_line_names_file_and_line(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"id": "a", "image": "x", "caption": "c", "labels": [0]}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2"):
        read_split(tmp_path / "s.jsonl")


def test_group_splits_keep_an_images_captions_together_and_equal_make_splits_without_groups():
    from cmhash.data.manifest import Item, make_group_splits, make_splits

    plain = [Item(str(i), f"{i}.jpg", "c", (0,)) for i in range(30)]
    expected = make_splits(30, query=5, train=10, val=5, seed=3)
    assert all((make_group_splits(plain, query=5, train=10, val=5, seed=3)[s] == expected[s]).all() for s in expected)
    grouped = [Item(f"{i}/{k}", f"{i}.jpg", "c", (0,), group=str(i)) for i in range(30) for k in range(i % 3 + 1)]
    splits = make_group_splits(grouped, query=5, train=10, val=5, seed=3)
    images = {s: {grouped[r].group for r in rows} for s, rows in splits.items()}
    assert {s: len(g) for s, g in images.items()} == {"query": 5, "retrieval": 25, "train": 10, "val": 5}  # sizes count images
    assert not images["query"] & images["retrieval"]
    for split, rows in splits.items():  # every caption of a chosen image comes along
        assert {grouped[r].id for r in rows} == {it.id for it in grouped if it.group in images[split]}
