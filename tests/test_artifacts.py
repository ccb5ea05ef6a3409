"""Artifacts and answers a user can rely on: checkpoints that are byte-reproducible, one wording
for every refused file, progress on stderr, files that follow the umask, captions cleaned the
same way everywhere, and commands that answer `--help` and config mistakes without torch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from cmhash.data.captions import clean_caption
from cmhash.data.datasets.common import EMPTY_CAPTION, ItemSink
from cmhash.errors import DataError
from cmhash.io import atomic_dir, atomic_write_text, load_pickle, save_state
from cmhash.models import CrossModalHasher, ModelConfig, load_checkpoint, save_checkpoint


def tiny_model() -> CrossModalHasher:
    torch.manual_seed(0)
    knobs = {"d_model": None, "nhead": 2, "num_layers": 1, "dim_feedforward": 16, "dropout": 0.1}
    return CrossModalHasher(ModelConfig(arch="reference", knobs=knobs, feature_dim=8))


class Exploit:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


# ------------------------------------------------------------------ byte-reproducible checkpoints


def test_the_same_state_saves_to_the_same_bytes(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"epoch": 3}}
    save_state(tmp_path / "a.pt", state)
    save_state(tmp_path / "b-other-name.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b-other-name.pt").read_bytes()


def test_checkpoints_of_one_model_are_identical_files(tmp_path):
    """save_checkpoint goes through a randomly named temporary file; the bytes must not show it."""
    model = tiny_model()
    save_checkpoint(tmp_path / "one" / "model.pt", model)
    save_checkpoint(tmp_path / "two" / "model.pt", model)
    assert (tmp_path / "one" / "model.pt").read_bytes() == (tmp_path / "two" / "model.pt").read_bytes()
    loaded, _ = load_checkpoint(tmp_path / "one" / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# ------------------------------------------------------------------ refused files: one wording, nothing executed


def assert_refused(message: str, path) -> None:
    assert str(path) in message and "posix.system" in message and "not executed" in message
    assert "weights_only" not in message and "\n" not in message  # never suggests turning the check off


def load_clip_weights(path):
    from cmhash.features.clip import load_clip

    return load_clip("cmhash-tiny", str(path), torch.device("cpu"))


# (file name, how a malicious file of that kind is written, the loader that reads it)
FILES_HOLDING_CODE = {
    "checkpoint": ("model.pt", lambda p: torch.save({"config": Exploit(), "state_dict": {}}, p), load_checkpoint),
    "feature pickle": ("train.pkl", lambda p: p.write_bytes(pickle.dumps({"image": Exploit()})), load_pickle),
    "CLIP weights": ("weights.pt", lambda p: torch.save({"state_dict": Exploit()}, p), load_clip_weights),
}


@pytest.mark.parametrize("kind", FILES_HOLDING_CODE)
def test_every_loader_refuses_a_file_holding_code_in_the_same_words(tmp_path, monkeypatch, kind):
    name, write, load = FILES_HOLDING_CODE[kind]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as err:
        load(path)
    assert_refused(str(err.value), path)
    assert not (tmp_path / "pwned").exists()


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"definitely not a zip archive" * 10)
    with pytest.raises(DataError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "weights_only" not in str(err.value)


def test_a_torch_file_without_our_keys_is_not_a_cmhash_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(DataError, match="not a cmhash model checkpoint"):
        load_checkpoint(path)


# ------------------------------------------------------------------ files and streams


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setattr("cmhash.io.UMASK", umask)
    atomic_write_text(tmp_path / "out.json", "{}")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_umask_is_read_from_the_process(tmp_path):
    code = "import os; os.umask(0o027); from cmhash.io import UMASK; print(oct(UMASK))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "0o27"


def test_progress_bars_go_to_stderr(capsys):
    from cmhash.runtime.progress import progress_bar

    with progress_bar("work", total=3, unit="item") as advance:
        advance(3)
    out, err = capsys.readouterr()
    assert out == "" and "work" in err


# ------------------------------------------------------------------ captions


@pytest.mark.parametrize(("raw", "clean"), [
    ("a  dog\ton a\nbeach ", "a dog on a beach"),
    ("a\x00dog", "a dog"),  # a control character separates like a space
    ("zero\u200bwidth", "zerowidth"),  # a format character is dropped
    ("\x00\x07\t \u200b", ""),  # only control, format and space characters: empty
    ("café ☕ [bold]", "café ☕ [bold]"),  # anything printable stays as it is
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_a_caption_of_control_characters_is_an_empty_caption(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    sink = ItemSink()
    sink.offer("1", image, "\x00\x01\x02 \t", [0])
    assert not sink.items and sink.skipped[0].reason == EMPTY_CAPTION


# ------------------------------------------------------------------ split sizes


def test_split_sizes_past_the_pairs_are_one_line_naming_the_keys(params, params_file, invoke, one_line_error):
    params["data"]["demo"].update(n_items=20, query=10, train=10, val=5)
    params_file.write_text(yaml.safe_dump(params))
    line = one_line_error(invoke("prepare", "--params", params_file))
    assert "data.demo.query 10" in line and "data.demo.val 5" in line and "20 usable pairs" in line
    assert not (params_file.parent / "stages" / "prepare" / "train.jsonl").exists()


@pytest.mark.parametrize("bad", [-5, 0])
def test_split_sizes_below_one_are_refused(params, params_file, invoke, one_line_error, bad):
    params["data"]["demo"]["query"] = bad
    params_file.write_text(yaml.safe_dump(params))
    assert "data.demo.query" in one_line_error(invoke("prepare", "--params", params_file))


# ------------------------------------------------------------------ fast answers: no torch for --help or a config mistake


def torch_was_imported(args: list[str], cwd) -> bool:
    code = ("import sys; from cmhash.cli import app\n"
            "try:\n    app(args=sys.argv[1:], prog_name='cmhash')\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd)
    return done.stdout.strip().splitlines()[-1] == "TORCH"


@pytest.mark.parametrize("args", [["--help"], ["prepare", "--help"], ["extract", "--help"], ["train-fusion", "--help"],
                                  ["train-hash", "--help"], ["evaluate", "--help"], ["index", "--help"], ["search", "--help"],
                                  ["list", "losses"], ["train-fusion"], ["train-hash"], ["extract"], ["evaluate"]])
def test_help_and_config_errors_do_not_load_torch(tmp_path, args):
    (tmp_path / "params.yaml").write_text("train:\n  fusoin: {epochs: 3}\n")  # a mistake: the stages stop at it
    assert not torch_was_imported(args, tmp_path)


# ------------------------------------------------------------------ what search echoes


def test_a_caption_past_clips_context_is_known_to_be_cut():
    from cmhash.features.clip import caption_is_cut, load_clip

    clip = load_clip("cmhash-tiny", "none", torch.device("cpu"))
    assert clip.tokenizer.context_length == 77
    assert not caption_is_cut(clip, "word " * 75)  # 75 tokens + start + end = 77: all encoded
    assert caption_is_cut(clip, "word " * 76)


def test_search_echoes_a_long_caption_shortened_and_shows_the_notes():
    from rich.console import Console

    from cmhash.search.results import QUERY_ECHO_CHARS, search_table

    caption = "a red circle beside a blue square " * 20
    found = {"query": {"text": caption}, "searched": "image", "bits": 64, "clip": {"random_init": False},
             "notes": ["the caption was cut to CLIP's context of 77 tokens"],
             "results": [{"rank": 1, "distance": 3, "row": 0, "id": "7", "image": "a.png", "labels": []}]}
    console = Console(width=400, record=True)
    console.print(search_table(found))
    shown = " ".join(console.export_text().split())  # the table wraps its title and caption
    echoed = shown.split("'")[1]  # the query, as the title quotes it
    assert caption.startswith(echoed.removesuffix(" …")) and echoed.endswith("…") and len(echoed) <= QUERY_ECHO_CHARS
    assert "cut to CLIP's context of 77 tokens" in shown
