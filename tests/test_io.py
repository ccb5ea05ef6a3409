import os
import pickle

import numpy as np
import pytest

from cmhash.errors import DataError
from cmhash.io import atomic_write_text, load_pickle, save_pickle


def test_feature_dict_round_trips(tmp_path):
    data = {"image": np.random.rand(3, 4).astype(np.float32), "label": np.eye(3, dtype=np.uint8),
            "ids": ["a", "b", "c"], "random_init": True, "n": 3, "meta": {"x": [1.5, None]}}
    save_pickle(tmp_path / "f.pkl", data)
    back = load_pickle(tmp_path / "f.pkl")
    assert back.keys() == data.keys()
    np.testing.assert_array_equal(back["image"], data["image"])
    assert back["image"].dtype == np.float32 and back["label"].dtype == np.uint8
    assert back["ids"] == data["ids"] and back["meta"] == data["meta"]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"image": _RunsCode()}))
    with pytest.raises(DataError, match="refused to load"):
        load_pickle(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned.txt").exists()


def test_missing_and_truncated_pickles_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_pickle(tmp_path / "nope.pkl")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(DataError, match="cannot load"):
        load_pickle(tmp_path / "cut.pkl")


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
