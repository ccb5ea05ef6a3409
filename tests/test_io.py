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


def test_a_write_removes_what_killed_writes_of_the_same_output_left_and_nothing_else(tmp_path):
    import subprocess
    import sys

    from cmhash.io import atomic_dir

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is no longer running: a killed writer's
    dead, alive = child.pid, os.getppid()
    planted = {
        f".fusion.{dead}.k3j2_x9a.tmp": True,   # a killed writer's folder
        f".fusion.{dead}.k3j2_x9a.old": True,   # the previous folder it had set aside mid-swap
        ".fusion.q8w7e6r5.tmp": True,           # an older version's, with no pid
        f".fusion.{alive}.a1b2c3d4.tmp": False,  # a write still running
        f".fusion.extra.{dead}.a1b2c3d4.tmp": False,  # another output's (fusion.extra)
        f".hash.{dead}.a1b2c3d4.tmp": False,     # another output's
        "fusion.tmp": False,
    }
    for name in planted:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text("{}")
    (tmp_path / f".fusion.{dead}.zz.tmp").write_text("a killed atomic_path write")  # a file, not a folder
    with atomic_dir(tmp_path / "fusion") as out:
        (out / "metrics.json").write_text('{"new": 1}')
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"fusion"} | {name for name, removed in planted.items() if not removed}
    assert (tmp_path / "fusion" / "metrics.json").read_text() == '{"new": 1}'


def test_a_file_write_removes_its_own_stale_temporary_files(tmp_path):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / f".map.json.{child.pid}.abc123.tmp").write_text("half")
    (tmp_path / f".map.json.{os.getpid()}.def456.tmp").write_text("this process's own, still open")
    atomic_write_text(tmp_path / "map.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".map.json.{os.getpid()}.def456.tmp", "map.json"]
