"""The whole tiny pipeline as separate processes, as `dvc repro` runs it: the same seed gives the
same numbers byte for byte, and a process killed with SIGKILL (no cleanup of any kind) in the
middle of extraction or training leaves state that a re-run completes to exactly the result of
an uninterrupted run. Conditions: same machine, same torch thread count (these run with 1)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cmhash.io import load_pickle

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cmhash(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "cmhash", *args], cwd=cwd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def kill_when(cwd: Path, args: list[str], appears: str, timeout: float = 120) -> None:
    """Start `cmhash <args>` and SIGKILL it as soon as a file matching `appears` exists."""
    process = subprocess.Popen([sys.executable, "-m", "cmhash", *args], cwd=cwd, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not list(cwd.glob(appears)):
        assert process.poll() is None, f"{args} finished before {appears} appeared: nothing was interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


@pytest.fixture(scope="module")
def project_params(tmp_path_factory) -> dict:
    from conftest import tiny_params

    p = tiny_params()
    p["clip"]["shard_size"] = 16  # several shards, so extraction can die between them
    p["train"]["hash"]["epochs"] = 12  # long enough to be killed part-way
    return p


def new_project(root: Path, params: dict) -> Path:
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, project_params) -> Path:
    root = new_project(tmp_path_factory.mktemp("runs") / "whole", project_params)
    for stage in ("prepare", "extract", "train-fusion", "train-hash", "evaluate"):
        cmhash(root, stage)
    return root


def test_the_same_seed_gives_the_same_numbers(uninterrupted, tmp_path, project_params):
    again = new_project(tmp_path / "again", project_params)
    for stage in ("prepare", "extract", "train-fusion", "train-hash", "evaluate"):
        cmhash(again, stage)
    assert (again / "metrics/map.json").read_bytes() == (uninterrupted / "metrics/map.json").read_bytes()
    assert (again / "stages/fusion/model.pt").read_bytes() == (uninterrupted / "stages/fusion/model.pt").read_bytes()


def test_train_hash_killed_after_a_checkpoint_resumes_to_the_same_numbers(uninterrupted, tmp_path, project_params):
    killed = new_project(tmp_path / "killed", project_params)
    for part in ("stages/prepare", "stages/extract", "stages/fusion", "metrics/fusion"):
        shutil.copytree(uninterrupted / part, killed / part)
    kill_when(killed, ["train-hash"], "checkpoints/hash/16/last.pt")
    assert list(killed.glob("metrics/.hash.*.tmp"))  # the curves' atomic folder, left by the kill
    cmhash(killed, "train-hash")  # resumes checkpoints/hash/16, then trains 32
    assert not list(killed.glob("metrics/.hash.*")), "the resumed run left the killed run's temporary folder"
    cmhash(killed, "evaluate")
    assert (killed / "metrics/map.json").read_bytes() == (uninterrupted / "metrics/map.json").read_bytes()


def test_train_fusion_killed_mid_run_resumes_and_removes_its_temporary_folder(uninterrupted, tmp_path, project_params):
    killed = new_project(tmp_path / "killed", project_params)
    for part in ("stages/prepare", "stages/extract"):
        shutil.copytree(uninterrupted / part, killed / part)
    kill_when(killed, ["train-fusion"], "checkpoints/fusion/last.pt")
    assert list(killed.glob("metrics/.fusion.*.tmp"))
    cmhash(killed, "train-fusion")
    assert not list(killed.glob("metrics/.fusion.*")), "the resumed run left the killed run's temporary folder"
    assert (killed / "stages/fusion/model.pt").read_bytes() == (uninterrupted / "stages/fusion/model.pt").read_bytes()
    assert (killed / "metrics/fusion/metrics.json").read_bytes() == (uninterrupted / "metrics/fusion/metrics.json").read_bytes()


def test_extract_killed_between_shards_resumes_to_the_same_features(uninterrupted, tmp_path, project_params):
    killed = new_project(tmp_path / "killed", project_params)
    shutil.copytree(uninterrupted / "stages/prepare", killed / "stages/prepare")
    kill_when(killed, ["extract"], "stages/extract_shards/*.pkl")
    assert not (killed / "stages/extract").exists()  # nothing assembled from a part of the shards
    cmhash(killed, "extract")
    for split in ("train", "val", "query", "retrieval"):
        fresh, whole = load_pickle(killed / f"stages/extract/{split}.pkl"), load_pickle(uninterrupted / f"stages/extract/{split}.pkl")
        for key in ("image", "text", "label"):
            assert np.array_equal(fresh[key], whole[key]), (split, key)
        assert fresh["ids"] == whole["ids"]
