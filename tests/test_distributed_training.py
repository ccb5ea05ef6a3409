"""Training in several processes: DDP with gloo on CPU, 2 ranks spawned from pytest.

One spawned job (a module fixture) plays every rank's part of several checks, and the tests compare
what it recorded with one process: each loss's value and DDP-averaged gradients against the
one-process formula on the concatenated batch; DDP over both archs, every `train.inputs`, both
tasks (no unused parameter, the ranks' weights stay equal); train-fusion and train-hash through
the stages' own `run` with per-rank output paths (rank 0 alone writes, and its model matches one
process's); and the refusals (a batch that does not split, a resume with another world size).
Slow: torchrun end to end, and a rank SIGKILLed mid-run whose re-run resumes to the uninterrupted
result. Every process runs one torch thread."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from itertools import product
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cmhash.config.choices.archs import ARCHS
from cmhash.config.schema import parse_params
from cmhash.config.stages import TaskSettings
from cmhash.errors import ConfigError
from cmhash.io import save_pickle
from cmhash.losses import LOSSES, build_loss
from cmhash.models import CrossModalHasher, ModelConfig
from cmhash.pipeline import train_fusion, train_hash
from cmhash.runtime.distributed import current_world
from cmhash.runtime.seeding import reseed_rank
from cmhash.training.runner import VIEWS, Runner
from conftest import tiny_params
from test_training import D, Killed, epoch_lines, kill_before_saving_epoch, synthetic

WORLD = 2
BITS = [8, 16]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------ spawning a job


def _worker(rank: int, job: Callable[[int, Path], dict], root: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))  # as torchrun sets them
    torch.set_num_threads(1)
    # A collective one rank never joins (validation entering the loss's gather...) fails in a minute instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.save(job(rank, root), root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(job: Callable[[int, Path], dict], root: Path) -> list[dict]:
    """Run job(rank, root) in WORLD processes joined in one process group; what each returned."""
    torch.multiprocessing.spawn(_worker, args=(job, root), nprocs=WORLD)
    return [torch.load(root / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def params(**changes) -> dict:
    """The test params, dropout off (ranks then compute what one process computes), 4 steps an
    epoch (64 training pairs, global batch 16), validation at the last epoch only."""
    p = tiny_params()
    p["model"]["reference"]["dropout"] = 0.0
    p["hash_head"]["dropout"] = 0.0
    p["train"].update(eval_every=100)
    p["train"]["fusion"]["epochs"] = 5  # 20 steps
    p["train"]["hash"]["epochs"] = 1
    p["bits"] = BITS
    for key, value in changes.items():
        p["train"][key] = value
    return p


def settings(p: dict, task: str) -> TaskSettings:
    return TaskSettings.of(parse_params(p), task)


def run_stages(p: dict, root: Path, own: Path) -> None:
    """train-fusion, then train-hash from its model, as the stages run them; outputs in `own`."""
    train_fusion.run(settings(p, "fusion"), root / "features", own / "fusion/model.pt", own / "metrics/fusion", own / "checkpoints/fusion")
    written = root / "rank0" if current_world().distributed else own  # rank 0 wrote the fusion model every rank starts from
    train_hash.run(settings(p, "hash"), BITS, root / "features", written / "fusion/model.pt", own / "hash", own / "metrics/hash",
                   own / "checkpoints/hash")


# ------------------------------------------------------------------ the checks each rank plays


B, WIDTH = 8, 5  # the loss checks' global batch and width


class Projection(nn.Module):
    """Parameters for the loss checks to differentiate: one linear map per modality, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(WIDTH, WIDTH).double(), nn.Linear(WIDTH, WIDTH).double()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(x), self.text(y)


def loss_inputs() -> tuple[torch.Tensor, torch.Tensor, Projection]:
    """The global batch and the projection's initial weights, the same in every process."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, WIDTH, generator=g, dtype=torch.float64), torch.randn(B, WIDTH, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    return x, y, Projection()


def check_losses(rank: int) -> dict:
    """Each loss on this rank's rows (rank r: rows r*B/W to (r+1)*B/W - 1) through DDP."""
    out = {}
    for name in LOSSES.names():
        x, y, projection = loss_inputs()
        rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        ddp = DistributedDataParallel(projection)  # kept until after backward: its hooks average the gradients
        loss = build_loss(name)(*ddp(x[rows], y[rows]), current_world())
        loss.backward()
        out[name] = {"loss": loss.item(), "grads": [p.grad for p in projection.parameters()]}
    return out


def check_ddp_models(rank: int) -> dict:
    """Two optimiser steps through Runner under DDP for every arch, inputs and task, each rank with
    rows of its own and dropout on: no error, every parameter moved, the same weights on every rank."""
    out = {}
    for arch, inputs, bits in product(ARCHS.names(), VIEWS, [None, 8]):
        p = parse_params({**tiny_params(), "model": {**tiny_params()["model"], "arch": arch}})
        torch.manual_seed(0)
        model = CrossModalHasher(ModelConfig(arch=arch, knobs=p.model.knobs.model_dump(), feature_dim=D, bits=bits,
                                             hash_head=p.hash_head if bits else None))
        before = [w.detach().clone() for w in model.parameters()]
        torch.manual_seed(1 + rank)  # this rank's rows and dropout
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        key = f"{arch}/{inputs}/{bits}"
        try:
            runner = Runner(model, build_loss("infonce"), inputs, 0.5 if bits else None, current_world())
            for _ in range(2):  # DDP notices a parameter without gradient when the next step starts
                loss, _ = runner.step(torch.randn(4, D), torch.randn(4, D))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        except RuntimeError as exc:
            out[key] = str(exc).splitlines()[0]
            continue
        out[key] = {"moved": [not torch.equal(a, w) for a, w in zip(before, model.parameters())],
                    "weights": torch.cat([w.detach().flatten() for w in model.parameters()])}
    return out


def check_refusals(rank: int, root: Path) -> dict:
    """What each rank says for a batch that does not split and for another world size's run."""
    said = {}
    for case, p, checkpoints in [("batch", params(batch_size=15), root / f"rank{rank}/batch"),
                                 ("world", params(), root / "interrupted/checkpoints")]:
        try:
            train_fusion.run(settings(p, "fusion"), root / "features", root / f"rank{rank}/{case}/model.pt",
                             root / f"rank{rank}/{case}/metrics", checkpoints)
        except ConfigError as exc:
            said[case] = str(exc)
    return said


def every_check(rank: int, root: Path) -> dict:
    results = {"losses": check_losses(rank), "models": check_ddp_models(rank)}
    run_stages(params(), root, root / f"rank{rank}")
    results["refusals"] = check_refusals(rank, root)
    return results


# ------------------------------------------------------------------ the job, and one process to compare with


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Features (64 train, 16 val pairs) and an unfinished one-process run (stopped after epoch 1)."""
    root = tmp_path_factory.mktemp("ddp")
    save_pickle(root / "features/train.pkl", synthetic(64, seed=1))
    save_pickle(root / "features/val.pkl", synthetic(16, seed=2))
    with pytest.MonkeyPatch.context() as patch:
        kill_before_saving_epoch(patch, 2)
        with pytest.raises(Killed):
            train_fusion.run(settings(params(), "fusion"), root / "features", root / "interrupted/model.pt",
                             root / "interrupted/metrics", root / "interrupted/checkpoints")
    return root


@pytest.fixture(scope="module")
def job(root) -> list[dict]:
    return spawn(every_check, root)


@pytest.fixture(scope="module")
def one_process(root) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stages(params(), root, root / "one")
    finally:
        torch.set_num_threads(threads)
    return root / "one"


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def curves(metrics: Path) -> dict[str, list[float]]:
    """Every dvclive curve in `metrics`: its values by step."""
    return {tsv.relative_to(metrics).as_posix(): [float(line.split("\t")[1]) for line in tsv.read_text().splitlines()[1:]]
            for tsv in sorted(metrics.rglob("*.tsv"))}


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", LOSSES.names())
def test_each_loss_under_two_ranks_equals_one_process_on_the_whole_batch(job, name):
    x, y, projection = loss_inputs()
    expected = build_loss(name)(*projection(x, y))  # the one-process formula, on the concatenated rows
    expected.backward()
    ranks = [job[rank]["losses"][name] for rank in range(WORLD)]
    # The rank's parts average to the global loss; DDP's averaged gradients are the global ones.
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(expected.item(), abs=1e-6)
    for rank in ranks:
        for grad, param in zip(rank["grads"], projection.parameters()):
            torch.testing.assert_close(grad, param.grad, rtol=0, atol=1e-6)


def test_ddp_trains_every_arch_inputs_and_task_with_every_parameter(job):
    assert set(job[0]["models"]) == {f"{a}/{i}/{b}" for a, i, b in product(ARCHS.names(), VIEWS, [None, 8])}
    for key, result in job[0]["models"].items():
        assert isinstance(result, dict), f"{key}: {result}"
        assert all(result["moved"]), f"{key}: a parameter got no gradient"
        assert torch.equal(result["weights"], job[1]["models"][key]["weights"]), key


def test_rank_0_alone_writes_the_stages_outputs(job, root):
    own = root / "rank0"
    assert (own / "fusion/model.pt").is_file() and (own / "metrics/fusion/metrics.json").is_file()
    assert all((own / f"hash/{b}/model.pt").is_file() for b in BITS)
    assert set(json.loads((own / "metrics/hash/metrics.json").read_text())) >= {str(b) for b in BITS}
    assert not [f for f in (own / "checkpoints").rglob("*") if f.is_file()]  # finished runs leave nothing to resume
    assert not (root / "rank1").exists()  # not even the folders of its paths


def effective(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What of a parameter can change the model's outputs. The transformers here attend over one
    token (the reference arch's encoder, each modality's own encoder), where the softmax weight is
    always 1: the query and key thirds of those attention in-projections change nothing, their
    gradient is float rounding noise, and Adam (which divides by that noise's own size) turns it
    into full-lr steps of either sign. They are left out; the value third stays in."""
    if name.endswith(("encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.in_proj_bias")):
        return tensor[2 * len(tensor) // 3 :]
    return tensor


def test_two_ranks_train_the_weights_and_log_the_numbers_of_one_process(job, root, one_process):
    # 20 fusion steps (then 4 per code length), dropout off: the ranks' rows of every step are the
    # one-process batch. What differs is float32 rounding - the logits and gradients are summed in
    # other orders (per rank, then over ranks) - which stays near 1e-8 over these steps (1e-6 is
    # allowed); a wrong batch split, gather or gradient scale moves the weights by 1e-4 or more.
    for part in ["fusion", *(f"hash/{b}" for b in BITS)]:
        ddp, one = state(root / f"rank0/{part}/model.pt"), state(one_process / f"{part}/model.pt")
        assert ddp.keys() == one.keys()
        for name in one:
            torch.testing.assert_close(effective(name, ddp[name]), effective(name, one[name]), rtol=0, atol=1e-6, msg=f"{part}: {name}")
    for stage in ("fusion", "hash"):
        logged, expected = curves(root / f"rank0/metrics/{stage}"), curves(one_process / f"metrics/{stage}")
        assert logged.keys() == expected.keys()
        for name, values in expected.items():  # train/loss, train/top1_i2t... describe the global batch
            assert logged[name] == pytest.approx(values, rel=1e-5), name


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_in_one_line(job):
    for rank in range(WORLD):
        said = job[rank]["refusals"]["batch"]
        assert said == ("train.batch_size is the global batch, split evenly over the processes: 15 pairs per step "
                        "do not divide by 2 processes; use a multiple of 2")


def test_resuming_a_run_of_another_world_size_is_refused_in_one_line(job, root):
    for rank in range(WORLD):
        said = job[rank]["refusals"]["world"]
        assert "\n" not in said
        assert said.startswith(f"{root}/interrupted/checkpoints/last.pt is an unfinished run of 1 process(es) and this run has 2; ")
        assert said.endswith("or set train.resume: false")
    assert (root / "interrupted/checkpoints/last.pt").is_file()  # left for a run with 1 process


def test_the_distributed_settings_do_not_stop_a_resume(job, root):
    p = params()
    p["distributed"].update(timeout_s=60, backend="gloo")  # the interrupted run had the defaults
    train_fusion.run(settings(p, "fusion"), root / "features", root / "interrupted/model.pt", root / "interrupted/metrics",
                     root / "interrupted/checkpoints")
    assert (root / "interrupted/model.pt").is_file() and not (root / "interrupted/checkpoints").exists()


def test_rank_0_keeps_the_one_process_random_stream_and_other_ranks_get_their_own():
    def draws(rank: int) -> torch.Tensor:
        torch.manual_seed(2023)
        reseed_rank(2023, rank)
        return torch.rand(4)

    torch.manual_seed(2023)
    one_process = torch.rand(4)
    assert torch.equal(draws(0), one_process)
    assert torch.equal(draws(1), draws(1)) and not torch.equal(draws(1), draws(0)) and not torch.equal(draws(1), draws(2))


# ------------------------------------------------------------------ real jobs: torchrun, and the stage starting itself (slow)


def project(folder: Path, p: dict) -> Path:
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(p))
    return folder


def run_cmhash(cwd: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, "-m", "cmhash", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def files(folder: Path) -> set[str]:
    return {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}


@pytest.mark.slow
def test_torchrun_runs_train_fusion_and_train_hash_like_one_process(root, one_process, tmp_path):
    work = project(tmp_path / "work", params())
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD))
    printed = {}
    for stage in ("train-fusion", "train-hash"):
        done = run_cmhash(work, stage, "--features-dir", str(root / "features"), launcher=torchrun)
        assert done.returncode == 0, done.stderr
        printed[stage] = [(line["bits"], line["epoch"]) for line in epoch_lines(done.stderr)]
    # one line per validation (the last epoch here) from rank 0 alone, not one per rank
    assert printed == {"train-fusion": [(None, "5")], "train-hash": [(str(b), "1") for b in BITS]}
    assert files(work / "stages") == {"fusion/model.pt", *(f"hash/{b}/model.pt" for b in BITS)}
    for stage in ("fusion", "hash"):
        assert files(work / f"metrics/{stage}") == files(one_process / f"metrics/{stage}")
    for part in ["fusion", *(f"hash/{b}" for b in BITS)]:
        ddp, one = state(work / f"stages/{part}/model.pt"), state(one_process / f"{part}/model.pt")
        for name in one:
            torch.testing.assert_close(effective(name, ddp[name]), effective(name, one[name]), rtol=0, atol=1e-6, msg=f"{part}: {name}")


def worker(launcher: int, rank: int) -> int | None:
    """The pid of the worker of rank `rank` that the stage process `launcher` started (its run id
    names the launcher: cmhash.runtime.distributed.relaunch)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue  # not a process, or not ours
        if env.get("TORCHELASTIC_RUN_ID") == f"cmhash-{launcher}" and env.get("RANK") == str(rank):
            return int(proc.name)
    return None


def kill_rank_after_a_checkpoint(work: Path, rank: int, timeout: float = 120) -> subprocess.CompletedProcess:
    """Start `cmhash train-fusion` (2 processes), SIGKILL rank `rank` once last.pt exists (in the
    middle of the next epoch), and wait for the job to end."""
    job = subprocess.Popen([sys.executable, "-m", "cmhash", "train-fusion", "--features-dir", str(work.parent / "features")],
                           cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (work / "checkpoints/fusion/last.pt").is_file() or (pid := worker(job.pid, rank)) is None:
        assert job.poll() is None, "the job ended before a checkpoint: nothing was interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=timeout)
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_naming_it_and_the_rerun_resumes_to_the_uninterrupted_result(root, tmp_path):
    p = tiny_params()  # dropout on: every rank's random stream must come back
    p["distributed"]["nproc_per_node"] = WORLD
    p["train"].update(eval_every=3)
    p["train"]["fusion"]["epochs"] = 30
    (tmp_path / "features").symlink_to(root / "features")
    whole = project(tmp_path / "whole", p)
    done = run_cmhash(whole, "train-fusion", "--features-dir", str(tmp_path / "features"))
    assert done.returncode == 0, done.stderr

    killed = project(tmp_path / "killed", p)
    done = kill_rank_after_a_checkpoint(killed, rank=1)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == "error: rank 1 of 2 was killed by SIGKILL; the other ranks were stopped"
    assert not (killed / "stages/fusion/model.pt").exists()  # no output of a run that did not finish
    assert torch.load(killed / "checkpoints/fusion/last.pt", weights_only=True)["epoch"] < 30

    done = run_cmhash(killed, "--verbose", "train-fusion", "--features-dir", str(tmp_path / "features"))
    assert done.returncode == 0, done.stderr
    assert "resuming the unfinished run" in done.stderr
    assert state(killed / "stages/fusion/model.pt").keys() == state(whole / "stages/fusion/model.pt").keys()
    for name, tensor in state(whole / "stages/fusion/model.pt").items():
        assert torch.equal(state(killed / "stages/fusion/model.pt")[name], tensor), name
    assert (killed / "metrics/fusion/metrics.json").read_text() == (whole / "metrics/fusion/metrics.json").read_text()


@pytest.mark.parametrize("fails", [False, True])
def test_the_process_group_is_torn_down_after_a_barrier_only_when_the_block_succeeded(monkeypatch, fails):
    """Every rank waits for the others before destroying its group (a rank that tore down and
    exited while another still used their connections could abort at exit); after a failure the
    others may be gone, so there is no barrier, only the teardown."""
    from cmhash.config.schema import DistributedConfig
    from cmhash.runtime.distributed import process_group

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append("init"))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    with pytest.raises(ValueError) if fails else contextlib.nullcontext():
        with process_group(DistributedConfig(), "cpu") as world:
            assert world.rank == 1 and world.size == 2
            calls.append("work")
            if fails:
                raise ValueError("a user error on this rank")
    assert calls == (["init", "work", "destroy"] if fails else ["init", "work", "barrier", "destroy"])
