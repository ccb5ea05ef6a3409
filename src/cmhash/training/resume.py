"""Resuming an interrupted run (params.yaml `train.resume`).

A run keeps its state in a folder of its own (`checkpoints/fusion/`, `checkpoints/hash/<bits>/`;
git-ignored and not a DVC output, so `dvc repro` does not delete it before re-running a stage):

  last.pt  written atomically after every epoch: model, optimiser, lr schedule, loss scaler,
           epoch, best val MAP and its epoch, the hooks' state (early-stopping counters, the
           curves logged so far) and the random states - torch's CPU generator (dropout), CUDA's
           when present, and the batch-order generator. Nothing else draws random numbers during
           training (numpy and Python's `random` are only seeded), so they are not saved.
  best.pt  the best checkpoint so far (Checkpointer writes it); copied to the stage's output when
           the run ends, so a resumed run's output is the best over all its epochs.

A finished run removes both: the folder only ever holds an unfinished run. A run resumes only
if its fingerprint - every setting that shapes the result (seed, loss and its knobs, model,
code length, the task's training settings, the number of processes), the train/val features,
the weights it starts from and the training code - is the one stored; otherwise it stops with
one line naming what differs.

Under several processes the folder must be one every rank sees (a shared filesystem across
machines). Rank 0 writes last.pt with every rank's random states (gathered to it), and finishes
the run; every rank reads last.pt when resuming and restores its own random states, so a run
resumes only with as many processes as it had.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cmhash.errors import ConfigError, DataError
from cmhash.io import atomic_path, save_state, torch_load
from cmhash.runtime.distributed import ONE_PROCESS, World, all_gather_objects, barrier, broadcast
from cmhash.training.engine import Hook, TrainState

log = logging.getLogger("cmhash")

MISSING = object()


def tensor_digest(tensors: Iterable[Tensor]) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: so a mismatch can be named key by key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "batches": generator.get_state()}


def set_rng_state(saved: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(saved["torch"])
    generator.set_state(saved["batches"])
    if saved["cuda"] and torch.cuda.is_available() and len(saved["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["cuda"])


def remove_empty(folder: Path) -> None:
    """`folder` if empty, then each parent while empty (the folders a run created for it, e.g.
    checkpoints/hash/16, checkpoints/hash, checkpoints), never the working directory."""
    cwd = Path.cwd().resolve()
    for path in [folder, *folder.parents]:
        if path.resolve() == cwd:
            return
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): stop here
            return


class RunFolder:
    """The hook (run it after every other) that saves last.pt, plus starting and finishing a run."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], world: World = ONE_PROCESS) -> None:
        self.folder, self.fingerprint, self.world = Path(folder), flatten(fingerprint), world
        self.last_path, self.best_path = self.folder / "last.pt", self.folder / "best.pt"
        self.hooks: list[Hook] = []
        self.generator: torch.Generator | None = None

    def start(self, state: TrainState, generator: torch.Generator, hooks: list[Hook], *, resume: bool) -> bool:
        """Continue from last.pt when `resume` and there is one (True), else start afresh. Call
        after everything is built (building draws random numbers) and right before training."""
        self.hooks, self.generator = hooks, generator
        found = broadcast(self.last_path.is_file())  # as rank 0 sees it: every rank acts alike
        if resume and found:
            self.restore(state)
            log.info("resuming the unfinished run in %s after epoch %d (train.resume: true)", self.folder, state.epoch)
        elif self.world.main:
            if found:
                log.warning("train.resume is false: discarding the unfinished run in %s", self.folder)
            self.clear()
        barrier()  # every rank has read last.pt before rank 0 may replace it
        return resume and found

    def restore(self, state: TrainState) -> None:
        try:
            saved = torch_load(self.last_path)
        except DataError as exc:
            raise DataError(f"{exc}; delete {self.folder}/ to start afresh") from None
        stored = saved.get("fingerprint", {})
        if stored.get("world_size", 1) != self.world.size:
            raise ConfigError(f"{self.last_path} is an unfinished run of {stored.get('world_size', 1)} process(es) and this run has "
                              f"{self.world.size}; resume it with as many, delete {self.folder}/ to start afresh, or set train.resume: false")
        differ = sorted(k for k in {*stored, *self.fingerprint} if stored.get(k, MISSING) != self.fingerprint.get(k, MISSING))
        if differ:
            raise ConfigError(f"{self.last_path} is an unfinished run with other settings ({', '.join(differ[:6])}"
                              f"{', ...' if len(differ) > 6 else ''} differ); delete {self.folder}/ to start afresh, or set train.resume: false")
        state.runner.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.precision.load_state_dict(saved["scaler"])
        for hook in self.hooks:
            if hasattr(hook, "load_state_dict"):
                hook.load_state_dict(saved["hooks"][type(hook).__name__])
        state.epoch, state.best, state.best_epoch, state.stop = saved["epoch"], saved["best"], saved["best_epoch"], saved["stop"]
        set_rng_state(saved["rng"][self.world.rank], self.generator)  # last: nothing may draw random numbers after it

    def __call__(self, state: TrainState) -> None:
        rng = all_gather_objects(rng_state(self.generator))  # every rank's, in rank order
        if self.world.main:
            self.save(state, rng)
        barrier()  # this epoch is on disk before any rank goes on

    def save(self, state: TrainState, rng: list[dict[str, Any]]) -> None:
        with atomic_path(self.last_path) as tmp:
            save_state(tmp, {
                "fingerprint": self.fingerprint,
                "epoch": state.epoch, "best": state.best, "best_epoch": state.best_epoch, "stop": state.stop,
                "model": state.runner.model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.precision.state_dict(),
                "hooks": {type(h).__name__: h.state_dict() for h in self.hooks if hasattr(h, "state_dict")},
                "rng": rng,
            })

    def finish(self, out_path: Path) -> None:
        """The best checkpoint becomes the stage's output; the finished run's folder goes (rank 0)."""
        if not broadcast(self.best_path.is_file()):
            raise DataError("no checkpoint to keep: val MAP was never a number; check the features and the training curves")
        if self.world.main:
            with atomic_path(out_path) as tmp:
                shutil.copyfile(self.best_path, tmp)
            self.clear()
            remove_empty(self.folder)  # no empty folder stays once every run is done
        barrier()

    def clear(self) -> None:
        self.last_path.unlink(missing_ok=True)
        self.best_path.unlink(missing_ok=True)
