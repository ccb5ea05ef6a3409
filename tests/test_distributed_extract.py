"""Extraction in several processes (torchrun, gloo on CPU) and the launcher that starts them.

In-process, ranks are played one after another (RANK / WORLD_SIZE set, no process group: the
collectives do nothing): what each rank encodes, that rank 0 alone writes, and the launcher's
command line and messages with its workers not started. Spawned (slow), real 2-process jobs: a
worker's error and a SIGKILLed worker each end the job with one line naming the rank, and a
torchrun re-run resumes from the shards the dead job finished, to one process's feature files
byte for byte. Every process runs one torch thread, so the numbers can match."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from cmhash.config.schema import parse_params
from cmhash.config.stages import ExtractSettings, PrepareSettings
from cmhash.data.manifest import SPLITS, read_split
from cmhash.errors import DataError
from cmhash.features.clip import load_seeded_clip
from cmhash.io import load_pickle
from cmhash.pipeline import extract, prepare
from conftest import tiny_params, with_value

# The tests' 72 demo pairs in 24 shards of SHARD: rank 0 of 2 encodes shards 0, 2, ..., 22 and rank 1 shards 1, 3, ..., 23.
SHARD, BATCH = 3, 2  # batches of 2 and 1 within each shard
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}  # one torch thread (in-process: one_thread()); log lines unwrapped
OUTPUTS = [f"{split}.pkl" for split in SPLITS] + ["skipped.jsonl"]


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[dict, Path]:
    """Prepared manifests and params (extraction in 24 shards) in a project folder."""
    params = tiny_params()
    params["clip"].update(shard_size=SHARD, batch_size=BATCH)
    root = tmp_path_factory.mktemp("project")
    p = parse_params(params)
    prepare.run(PrepareSettings.of(p), root / "stages/prepare")
    return params, root


def run_extract(params: dict, root: Path, out: Path) -> None:
    p = parse_params(params)
    with one_thread():
        extract.run(ExtractSettings.of(p), root / "stages/prepare", out, out.parent / f"{out.name}.json")


class OneProcess(NamedTuple):
    out: Path  # what one process extracts: every distributed run must reproduce it byte for byte
    batches: list[int]  # the size of every image batch CLIP encoded, in order


@pytest.fixture(scope="module")
def one_process(project) -> OneProcess:
    params, root = project
    batches: list[int] = []

    def counting_load_clip(*args, **kwargs):
        clip = load_seeded_clip(*args, **kwargs)
        encode_image = clip.model.encode_image
        clip.model.encode_image = lambda images: batches.append(len(images)) or encode_image(images)
        return clip

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cmhash.features.clip.load_seeded_clip", counting_load_clip)  # extract imports it when it runs
        run_extract(params, root, root / "one/extract")
    return OneProcess(root / "one/extract", batches)


def assert_same_outputs(out: Path, metrics: Path, expected: Path) -> None:
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    assert metrics.read_bytes() == expected.parent.joinpath(f"{expected.name}.json").read_bytes()


def plan_ids(root: Path) -> list[list[str]]:
    """The pairs of each shard, in plan order: every distinct id of the splits, in order, SHARD at a time."""
    ids = list(dict.fromkeys(it.id for split in SPLITS for it in read_split(root / f"stages/prepare/{split}.jsonl")))
    return [ids[start : start + SHARD] for start in range(0, len(ids), SHARD)]


def shard_ids(folder: Path) -> set[tuple[str, ...]]:
    return {tuple(load_pickle(path)["ids"]) for path in folder.glob("*.pkl")}


# ------------------------------------------------------------------ ranks played in turn, in-process


def test_batches_never_cross_a_shard_boundary(one_process):
    """So a shard's features are the same whichever process encodes it, alone or after other shards."""
    assert one_process.batches == [2, 1] * 24


def test_each_rank_encodes_its_shards_and_rank_0_alone_assembles_them(project, one_process, tmp_path, monkeypatch, caplog):
    params, root = project
    out, shards = tmp_path / "extract", tmp_path / "extract_shards"
    plan = plan_ids(root)
    assert len(plan) == 24 and all(len(ids) == SHARD for ids in plan)
    monkeypatch.setenv("WORLD_SIZE", "2")

    monkeypatch.setenv("RANK", "0")  # first, before rank 1 has done anything: its shards are missing
    with pytest.raises(DataError, match=r"encoded by rank 1 of 2, is not there: every node must see the same working directory"):
        run_extract(params, root, out)
    assert shard_ids(shards) == {tuple(ids) for ids in plan[0::2]}
    assert not out.exists() and not (tmp_path / "extract.json").exists()

    monkeypatch.setenv("RANK", "1")
    run_extract(params, root, out)
    assert shard_ids(shards) == {tuple(ids) for ids in plan}  # its own twelve added
    assert not out.exists() and not (tmp_path / "extract.json").exists()  # rank 1 writes nothing else

    monkeypatch.setenv("RANK", "0")
    caplog.set_level("INFO", logger="cmhash")
    run_extract(params, root, out)
    assert "rank 0 of 2: reusing 12 of 12 finished shard(s)" in caplog.text  # its own, from its first run
    assert_same_outputs(out, tmp_path / "extract.json", one_process.out)
    assert not shards.exists()


# ------------------------------------------------------------------ the launcher, its workers not started


@pytest.fixture
def launches(params, params_file, monkeypatch) -> list[list[str]]:
    """params_file asks for 2 processes; the command line each launch would give its workers."""
    params_file.write_text(yaml.safe_dump(with_value(params, "distributed.nproc_per_node", 2)))
    launched: list[list[str]] = []
    monkeypatch.setattr("cmhash.runtime.launch.relaunch", lambda cfg, args: launched.append(args))
    return launched


def test_the_workers_get_the_command_line_as_given(launches, params_file, invoke):
    result = invoke("--verbose", "train-hash", "--params", params_file, "--bits", 16, "--bits", 32, "--out-dir", "out dir/hash")
    assert result.exit_code == 0, result.output
    (args,) = launches
    assert args[:2] == ["--verbose", "train-hash"]
    given = list(zip(args[2::2], args[3::2]))
    assert {("--params", str(params_file)), ("--bits", "16"), ("--bits", "32"), ("--out-dir", "out dir/hash"),
            ("--features-dir", "stages/extract")} <= set(given)  # the defaults too: the workers need not agree on them
    assert [value for option, value in given if option == "--bits"] == ["16", "32"]
    assert invoke(*args).exit_code == 0 and launches[1] == args  # the workers' own parse gives the same command line

    assert invoke("extract", "--params", params_file).exit_code == 0
    assert launches[2][0] == "extract"  # no --verbose when not asked


@pytest.mark.parametrize("command", ["train-fusion", "train-hash"])
def test_a_batch_that_does_not_split_over_the_processes_is_one_line_before_any_starts(launches, params, params_file, invoke,
                                                                                      one_line_error, command):
    params_file.write_text(yaml.safe_dump(with_value(with_value(params, "distributed.nproc_per_node", 2), "train.batch_size", 7)))
    assert one_line_error(invoke(command, "--params", params_file)) == (
        "error: train.batch_size is the global batch, split evenly over the processes: 7 pairs per step do not divide by "
        "2 processes; use a multiple of 2")
    assert launches == []  # no process was started


@pytest.mark.parametrize("command", ["prepare", "evaluate"])
def test_a_one_process_stage_under_torchrun_is_refused(params_file, invoke, one_line_error, monkeypatch, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert one_line_error(invoke(command, "--params", params_file)) == (
        f"error: rank 1: `cmhash {command}` runs in one process, not 2: run it without torchrun "
        "(only extract, train-fusion, train-hash run in several)")
    assert not (params_file.parent / "stages").exists()


def test_ctrl_c_of_the_launcher_is_one_line_and_its_workers_get_a_share_of_the_cores(params, params_file, invoke, one_line_error,
                                                                                     monkeypatch):
    from torch.distributed.elastic.multiprocessing.api import SignalException

    params_file.write_text(yaml.safe_dump(with_value(params, "distributed.nproc_per_node", 2)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = []

    def interrupted(config, entrypoint):
        def run(*args):
            threads.append(os.environ["OMP_NUM_THREADS"])
            raise SignalException("got SIGINT", signal.SIGINT)

        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", interrupted)
    line = one_line_error(invoke("extract", "--params", params_file))
    assert line == "error: stopped by SIGINT, and so were all 2 ranks; run it again to resume from what they saved"
    assert threads == [str(max(1, os.cpu_count() // 2))] and "OMP_NUM_THREADS" not in os.environ


def test_the_first_worker_to_fail_is_the_one_named(params, params_file, invoke, one_line_error, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    params_file.write_text(yaml.safe_dump(with_value(params, "distributed.nproc_per_node", 3)))

    def failure(exitcode: int, timestamp: int) -> ProcessFailure:
        failed = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="")
        failed.timestamp = timestamp
        return failed

    def failing(config, entrypoint):
        def run(*args):  # rank 2 was killed first; rank 0 then failed on its own
            raise ChildFailedError("cmhash", {0: failure(1, 1002), 2: failure(-signal.SIGKILL, 1000)})

        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", failing)
    assert one_line_error(invoke("extract", "--params", params_file)) == \
        "error: rank 2 of 3 was killed by SIGKILL; the other ranks were stopped"


def test_a_collective_that_fails_is_one_line_and_other_errors_pass(monkeypatch):
    import torch.distributed as dist

    from cmhash.config.schema import DistributedConfig
    from cmhash.runtime.distributed import RankFailed, process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: None)  # no other process to join
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:13708. "
            "This is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error.")
    with pytest.raises(RankFailed) as caught, process_group(DistributedConfig(), "cpu"):
        raise RuntimeError(gloo)
    assert str(caught.value) == "a collective with the other ranks failed: Connection closed by peer [127.0.0.1]:13708"
    with pytest.raises(RuntimeError, match="^a bug$"), process_group(DistributedConfig(), "cpu"):
        raise RuntimeError("a bug")  # not a collective's: its traceback stays


# ------------------------------------------------------------------ real 2-process jobs (torchrun, the launcher)


def new_project(root: Path, params: dict, tmp_path: Path) -> Path:
    """The prepared project's manifests, with these params."""
    work = tmp_path / "work"
    (work / "stages").mkdir(parents=True)
    (work / "stages/prepare").symlink_to(root / "stages/prepare")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def cmhash(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmhash", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_a_worker_error_is_one_line_per_failing_rank_and_a_line_for_the_job(project, tmp_path):
    params, root = project
    broken = with_value(with_value(params, "distributed.nproc_per_node", 2), "clip.pretrained", "no-such-weights.pt")
    work = new_project(root, broken, tmp_path)
    done = cmhash(work, "extract")  # the launcher's own parse accepts any weights name; each worker finds none there
    assert done.returncode == 1
    lines = error_lines(done.stderr)
    assert lines and len(lines) == len([line for line in done.stderr.splitlines() if line.strip()]), done.stderr  # nothing but them
    job = lines[-1]
    assert job.startswith("error: rank ") and " of 2 exited with code 1 " in job, job
    rank = job.split()[2]
    for r in ("0", "1"):
        assert len([line for line in lines if line.startswith(f"error: rank {r}: ")]) <= 1, done.stderr
    why = f"error: rank {rank}: clip.pretrained 'no-such-weights.pt' is neither a file nor a tag"
    assert len([line for line in lines if line.startswith(why)]) == 1, done.stderr


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def rank_of(pid: int) -> int | None:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(entry[5:]) for entry in environ if entry.startswith(b"RANK=")), None)


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_cleanly_and_torchrun_resumes_it_to_one_process_features(project, one_process, tmp_path):
    params, root = project
    work = new_project(root, with_value(params, "distributed.nproc_per_node", 2), tmp_path)
    options = ["--out-dir", "feature files/extract", "--metrics", "m/extract.json"]  # passed on to the workers as given
    job = subprocess.Popen([sys.executable, "-m", "cmhash", "extract", *options], cwd=work, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, shards = work / "feature files/extract", work / "feature files/extract_shards"
    deadline = time.monotonic() + 240
    while not list(shards.glob("*.pkl")):  # the workers are at work
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    (victim,) = [pid for pid in children(job.pid) if rank_of(pid) == 1]
    os.kill(victim, signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)

    assert job.returncode == 1
    *survivor, last = error_lines(stderr)
    assert last == "error: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped"
    # rank 0, waiting for rank 1, may see it go before the launcher stops it: one line too
    assert len(survivor) <= 1 and all(line.startswith("error: rank 0: a collective with the other ranks failed: ") for line in survivor), stderr
    assert not out.exists() and not (work / "m/extract.json").exists()  # nothing assembled from a part of the shards
    finished = len(list(shards.glob("*.pkl")))
    assert 0 < finished < 24

    # The re-run, under torchrun this time (which makes nproc_per_node moot): each rank reuses its finished shards.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cmhash", "--verbose", "extract", *options], cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same_outputs(out, work / "m/extract.json", one_process.out)
    assert not shards.exists()
    # --verbose: rank 1 logs at INFO too, yet only rank 0 reports (and writes) the assembled features
    summary = f"extract: 72 pairs in 24 shard(s), {finished} reused; encoded {72 - SHARD * finished} pairs"
    assert [line.split(": ")[0] for line in done.stderr.splitlines() if summary in line] == ["INFO     rank 0"], done.stderr
