"""Every bad input and disk fault is one `error:` line that names the key or file, and loses
nothing: the outputs of the last good run (stages/, metrics/) stay byte for byte and no temporary
file is left. One tiny pipeline is built per module; each test works on a copy of it."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cmhash.errors import DataError, DiskError
from cmhash.io import all_or_nothing, atomic_dir, atomic_write_text, load_pickle, save_pickle
from conftest import tiny_params

STAGES = ("prepare", "extract", "train-fusion", "train-hash", "evaluate")
ARGS = {"index": ["--split", "retrieval"]}  # the search index of the retrieval split, stages/index/
WORK = "stages/extract_shards"  # extract's resume state, not an output: a failed run may keep shards there


def invoke(*args):
    from cmhash.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The whole tiny pipeline, run once: the outputs of a last good run."""
    root = tmp_path_factory.mktemp("built")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in (*STAGES, "index"):
            result = invoke(stage, *ARGS.get(stage, []))
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def project(built, tmp_path, monkeypatch) -> Path:
    """A copy of the built pipeline as the working directory."""
    root = tmp_path / "project"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under stages/ and metrics/ (extract's work folder aside)."""
    files = [p for d in ("stages", "metrics") for p in (root / d).rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if not str(p.relative_to(root)).startswith(WORK)}


def temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")] + [p for p in root.rglob(".*.old")]


def error_line(result) -> str:
    """Exit code 1, no traceback, exactly one `error:` line and it comes last (warnings logged
    before the failure, e.g. random-init CLIP's, may precede it)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    return errors[0]


def assert_fails_cleanly(root: Path, stage: str, words: list[str]) -> str:
    before = snapshot(root)
    line = error_line(invoke(stage, *ARGS.get(stage, [])))
    for word in words:
        assert word in line, line
    assert snapshot(root) == before
    assert not temporary_files(root)
    return line


# ------------------------------------------------------------------ mutations of params or of a file


def set_param(dotted: str, value) -> Callable[[Path, dict], None]:
    def mutate(root: Path, params: dict) -> None:
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[key] = value

    return mutate


def edit_features(split: str, edit: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def mutate(root: Path, params: dict) -> None:
        path = root / f"stages/extract/{split}.pkl"
        data = load_pickle(path)
        edit(data)
        save_pickle(path, data)

    return mutate


def both(*mutations):
    def mutate(root: Path, params: dict) -> None:
        for m in mutations:
            m(root, params)

    return mutate


def narrower(data: dict) -> None:
    data["image"], data["text"] = data["image"][:, :-1], data["text"][:, :-1]


def a_nan(data: dict) -> None:
    data["image"][3, 0] = np.nan


def strings(data: dict) -> None:
    data["image"] = data["image"].astype(str)


def narrower_text(data: dict) -> None:
    data["text"] = data["text"][:, :-1]


def short_labels(data: dict) -> None:
    data["label"] = data["label"][:-1]


def corrupt_first_image(root: Path, params: dict) -> None:
    params["data"]["on_bad_item"] = "fail"
    first = (root / "stages/prepare/train.jsonl").read_text().splitlines()[0]
    image = root / yaml.safe_load(first)["image"]
    image.write_bytes(b"\xff\xd8 not a jpeg")


def garbage_clip_weights(root: Path, params: dict) -> None:
    (root / "garbage.pt").write_text("hello world")
    params["clip"]["pretrained"] = "garbage.pt"


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def code_in_checkpoint(root: Path, params: dict) -> None:
    torch.save({"config": Exploit(), "state_dict": {}}, root / "stages/fusion/model.pt")


def foreign_checkpoint(root: Path, params: dict) -> None:
    torch.save({"weights": torch.zeros(2)}, root / "stages/hash/16/model.pt")


def no_gpu(root: Path, params: dict) -> None:
    params["device"] = "cuda"
    torch.cuda.is_available = lambda: False  # undone by the test (monkeypatch)


CASES = [
    # (stage, mutation, key words of the message)
    ("train-fusion", set_param("loss", "hinge"), ["loss", "hinge"]),
    ("prepare", set_param("data.name", "imagenet"), ["data.name", "imagenet"]),
    ("prepare", both(set_param("data.name", "coco"), set_param("data.root", "nowhere")), ["nowhere"]),
    ("extract", corrupt_first_image, ["bad image", "on_bad_item"]),
    ("extract", set_param("clip.precision", "fp16"), ["fp16"]),
    ("extract", garbage_clip_weights, ["garbage.pt", "CLIP weights"]),
    ("train-fusion", no_gpu, ["CUDA"]),
    ("train-fusion", edit_features("train", a_nan), ["train.pkl", "NaN"]),
    ("train-fusion", edit_features("train", strings), ["train.pkl", "'image'", "not numbers"]),
    ("train-fusion", edit_features("val", short_labels), ["val.pkl", "'label'"]),
    ("train-fusion", edit_features("train", narrower_text), ["train.pkl", "'image'", "'text'"]),
    ("train-hash", both(edit_features("train", narrower), edit_features("val", narrower)),
     ["train.pkl", "stages/fusion/model.pt", "31 wide", "trained on 32"]),
    ("evaluate", both(edit_features("query", narrower), edit_features("retrieval", narrower)),
     ["query.pkl", "stages/fusion/model.pt", "31 wide", "trained on 32"]),
    ("evaluate", code_in_checkpoint, ["stages/fusion/model.pt", "posix.system", "not executed"]),
    ("evaluate", foreign_checkpoint, ["stages/hash/16/model.pt", "not a cmhash model checkpoint"]),
]


@pytest.mark.parametrize(("stage", "mutate", "words"), CASES, ids=[f"{c[0]}-{c[1].__name__}-{c[2][0]}" for c in CASES])
def test_a_bad_input_is_one_line_and_loses_nothing(project, monkeypatch, stage, mutate, words):
    monkeypatch.setattr(torch.cuda, "is_available", torch.cuda.is_available)  # restored after no_gpu
    params = yaml.safe_load((project / "params.yaml").read_text())
    mutate(project, params)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert_fails_cleanly(project, stage, words)
    assert not (project / "pwned").exists()


def test_feature_width_is_read_from_the_file(project):
    """The widths in the rows above are the tiny CLIP's: check the premise."""
    assert load_pickle(project / "stages/extract/train.pkl")["image"].shape[1] == 32


def test_the_skip_report_names_the_image(project, monkeypatch):
    corrupt_first_image(project, {"data": {}})
    assert invoke("extract").exit_code == 0
    rows = [yaml.safe_load(line) for line in (project / "stages/extract/skipped.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]) == {"id", "image", "reason"}
    assert (project / rows[0]["image"]).read_bytes() == b"\xff\xd8 not a jpeg"


# ------------------------------------------------------------------ disk faults


class FaultyOs:
    """`os` as cmhash.io sees it, except that the `fail_at`-th temporary file it makes cannot be
    written: a few bytes get in, then the disk answers with `code`."""

    def __init__(self, code: int, fail_at: int) -> None:
        self.code, self.fail_at, self.calls = code, fail_at, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fchmod(self, fd: int, mode: int) -> None:
        os.fchmod(fd, mode)
        self.calls += 1
        if self.calls == self.fail_at:
            os.write(fd, b"half")
            raise OSError(self.code, os.strerror(self.code))


# which temporary file fails: the second by default (the first is written by then); evaluate's
# ninth is in metrics/map/, after its codes; index writes one file through cmhash.io
FAIL_AT = {"evaluate": 9, "index": 1}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("stage", [*STAGES, "index"])
def test_a_disk_fault_part_way_is_one_line_and_keeps_the_last_outputs(project, monkeypatch, stage, code):
    import cmhash.io

    fail_at = FAIL_AT.get(stage, 2)
    faulty = FaultyOs(code, fail_at)
    monkeypatch.setattr(cmhash.io, "os", faulty)
    line = assert_fails_cleanly(project, stage, ["cannot write", os.strerror(code)])
    assert faulty.calls >= fail_at and ".tmp" not in line, line


def test_a_read_only_output_folder_is_one_line(project, monkeypatch):
    import cmhash.io

    folder = project / "stages/prepare"
    if os.geteuid() == 0:  # root writes into read-only folders: make creating a file there fail as it would
        real = cmhash.io.tempfile.mkstemp

        def mkstemp(dir, **kwargs):
            if Path(dir).resolve() == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return real(dir=dir, **kwargs)

        monkeypatch.setattr(cmhash.io.tempfile, "mkstemp", mkstemp)
    folder.chmod(0o555)
    try:
        assert_fails_cleanly(project, "prepare", ["cannot write", "stages/prepare/", "Permission denied"])
    finally:
        folder.chmod(0o755)


def test_a_fault_outside_the_writers_is_one_line_naming_the_file(project, monkeypatch):
    def unreadable(path, *args):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr("cmhash.features.store.load_pickle", unreadable)
    assert_fails_cleanly(project, "train-fusion", ["stages/extract/train.pkl", os.strerror(errno.EIO)])


def test_a_folder_swap_that_fails_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "map"
    target.mkdir()
    (target / "a.json").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(src).suffix == ".tmp" and Path(dst) == target:  # the new folder cannot go in
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DiskError, match="cannot write .*map: No space left on device"), atomic_dir(target) as tmp:
        (tmp / "a.json").write_text("new")
    assert (target / "a.json").read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_files_written_together_land_together(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with pytest.raises(RuntimeError), all_or_nothing():
        atomic_write_text(tmp_path / "a.txt", "new a")
        atomic_write_text(tmp_path / "b.txt", "new b")
        raise RuntimeError("the third output failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"
    with all_or_nothing():
        atomic_write_text(tmp_path / "a.txt", "new a")
        assert (tmp_path / "a.txt").read_text() == "old a"  # not before the block ends
    assert (tmp_path / "a.txt").read_text() == "new a"


def test_a_refused_feature_file_keeps_the_last_curves(project):
    """dvclive clears its folder when it starts: it must not start on the real one."""
    edit_features("train", a_nan)(project, {})
    curves = snapshot(project)
    assert any(name.startswith("metrics/fusion/plots") for name in curves)
    assert_fails_cleanly(project, "train-fusion", ["train.pkl"])


# ------------------------------------------------------------------ pickles of protocol-2-era code


def test_a_protocol_2_feature_file_loads(tmp_path):
    data = {"image": np.arange(6, dtype=np.float32).reshape(2, 3), "label": np.eye(2, dtype=np.uint8), "ids": ["a", "b"]}
    raw = pickle.dumps(data, protocol=2)
    assert b"_codecs\nencode" in raw  # how protocol 2 stores an array's bytes
    (tmp_path / "old.pkl").write_bytes(raw)
    loaded = load_pickle(tmp_path / "old.pkl")
    assert all(np.array_equal(loaded[k], v) for k, v in data.items())


def python2_pickle(array: np.ndarray) -> bytes:
    """{'image': array} as numpy under Python 2 pickles it with protocol 2 (a str is SHORT_BINSTRING)."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    raw = array.tobytes()
    return (b"\x80\x02}q\x00" + s(b"image") + b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85"
            + s(b"b") + b"\x87Rq\x03(K\x01K\x02K\x03\x86cnumpy\ndtype\nq\x04" + s(b"f4") + b"K\x00K\x01\x87Rq\x05(K\x03" + s(b"<")
            + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<I", len(raw)) + raw + b"tbs.")


def test_a_python_2_feature_file_loads(tmp_path):
    array = np.array([[1.5, -2.0, 3.25], [0.0, 255.0, 1e-3]], dtype="<f4")  # bytes above 0x7f too
    (tmp_path / "py2.pkl").write_bytes(python2_pickle(array))
    assert np.array_equal(load_pickle(tmp_path / "py2.pkl")["image"], array)


def codecs_call(encoding: bytes) -> bytes:
    return b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX" + struct.pack("<I", len(encoding)) + encoding + b"\x86R."


@pytest.mark.parametrize(("raw", "refused"), [
    (codecs_call(b"rot13"), "_codecs.encode with encoding 'rot13'"),
    (codecs_call(b"latin-1"), "_codecs.encode with encoding 'latin-1'"),  # Python writes exactly 'latin1'
    (b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00id\x85R.", "posix.system"),
    (b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.", "builtins.eval"),
    (b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.", "__builtin__.eval"),  # a Python 2 name
    (b"\x80\x02c_codecs\ndecode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00latin1\x86R.", "_codecs.decode"),
], ids=["rot13", "latin-1", "system", "eval", "py2-eval", "decode"])
def test_everything_else_stays_refused(tmp_path, raw, refused):
    (tmp_path / "bad.pkl").write_bytes(raw)
    with pytest.raises(DataError) as err:
        load_pickle(tmp_path / "bad.pkl")
    assert refused in str(err.value) and "not executed" in str(err.value)


def test_the_latin1_codec_is_the_one_python_writes():
    assert b"latin1" in pickle.dumps(b"\xff", protocol=2)
    assert pickle.loads(pickle.dumps(b"\xff", protocol=2)) == b"\xff"
