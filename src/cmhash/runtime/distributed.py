"""Several processes, on one machine or several, through PyTorch's own launcher (torchrun).

torchrun starts one process per GPU (or per CPU slot) and tells each who it is through the
environment (RANK, LOCAL_RANK, WORLD_SIZE); `World` reads that. `process_group` joins the
processes (gloo on CPU, NCCL on CUDA) with a timeout, so a hung collective becomes an error
instead of a silent stall. Without torchrun, a stage whose params ask for
`distributed.nproc_per_node > 1` starts itself under torch's elastic launcher (`relaunch`).
One process (WORLD_SIZE unset or 1) is the plain, undistributed path: nothing here does anything.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cmhash.config.schema import DistributedConfig
from cmhash.errors import CmhashError, ConfigError

# torchrun sets this in every worker it starts; its absence means "not under torchrun".
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"


class RankFailed(CmhashError):
    """A worker process of a distributed job failed; the message names its rank."""


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its machine: its GPU index
    size: int = 1  # processes in all

    @property
    def main(self) -> bool:
        """Rank 0: the process that validates, logs and writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


ONE_PROCESS = World()  # the plain, undistributed run


def current_world() -> World:
    """Who this process is, as torchrun's environment says (one process when unset)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def under_launcher() -> bool:
    return LAUNCHER_ENV in os.environ


def backend_for(cfg: DistributedConfig, device_type: str) -> str:
    """`auto`: NCCL for CUDA tensors, gloo for CPU ones."""
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device_type == "cuda" else "gloo"


@contextmanager
def process_group(cfg: DistributedConfig, device_type: str) -> Iterator[World]:
    """Join the job's process group for the block (a no-op for one process)."""
    world = current_world()
    if not world.distributed:
        yield world
        return
    import torch.distributed as dist

    if device_type == "cuda":
        import torch

        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend_for(cfg, device_type), timeout=timedelta(seconds=cfg.timeout_s))
    try:
        yield world
        # Tear down together: a rank that destroyed its group and exited while another still used
        # the connections between them could abort at exit ("terminate called without an active
        # exception": a gloo thread still joinable when the process ends). After a failure the
        # other ranks may be gone, so only a successful block waits here.
        dist.barrier()
    except RuntimeError as exc:
        if not (isinstance(exc, dist.DistError) or "gloo/transport" in str(exc)):
            raise
        # Most often another rank died (the launcher's last line names it) or a collective timed out:
        # the first sentence, without gloo's source-file prefix, says which.
        detail = re.sub(r"^\[[^\]]*\] ", "", str(exc).strip().splitlines()[0]).split(". ")[0]
        raise RankFailed(f"a collective with the other ranks failed: {detail}") from None
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op for one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(value: Any, src: int = 0) -> Any:
    """`value` as rank `src` has it, on every rank (plain Python values: numbers, strings, dicts
    of them; passed between this job's own processes only). One process: `value` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def relaunch(cfg: DistributedConfig, args: list[str]) -> None:
    """Run `python -m cmhash <args>` in `cfg.nproc_per_node` processes on this machine through
    torch's elastic launcher (what torchrun runs) and wait for them. A failed worker fails the
    job: the launcher stops the others, and RankFailed names the rank and how it ended. Each
    worker gets an equal share of the CPU cores as torch threads unless OMP_NUM_THREADS says."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=cfg.nproc_per_node, run_id=f"cmhash-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    threads_unset = "OMP_NUM_THREADS" not in os.environ  # the workers inherit this process's environment
    if threads_unset:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node))
    logging.disable(logging.CRITICAL)  # the launcher's own log lines (set-up, each failure): RankFailed says it in one
    try:
        elastic_launch(config, sys.executable)("-m", "cmhash", *args)
    except ChildFailedError as exc:
        # The first to fail is the root cause; the launcher stopped the others after it.
        rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
        raise RankFailed(f"rank {rank} of {cfg.nproc_per_node} {_how_it_ended(failure.exitcode)}; the other ranks were stopped") from None
    except SignalException as exc:  # Ctrl-C or a kill of this process: the launcher has stopped every rank
        raise CmhashError(f"stopped by {exc.sigval.name}, and so were all {cfg.nproc_per_node} ranks; "
                          "run it again to resume from what they saved") from None
    finally:
        logging.disable(logging.NOTSET)
        if threads_unset:
            del os.environ["OMP_NUM_THREADS"]


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode} (its own message, if it wrote one, is above)"


# ------------------------------------------------------------------ collectives for data-parallel training


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (plain Python values and CPU tensors,
    passed between this job's own processes only). One process: [value]."""
    if not _initialised():
        return [value]
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def gather_rows(tensor: Any) -> Any:
    """Every rank's rows of `tensor` (the same shape on every rank) stacked in rank order, without
    gradient: to measure the global batch. One process: `tensor` itself."""
    if not _initialised():
        return tensor
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_rows_with_grad(tensor: Any) -> Any:
    """Every rank's rows of `tensor` stacked in rank order ([W * b, ...] from [b, ...] on each of
    W ranks), differentiable: a loss computed on the result sends gradients back to the rank that
    owns each row. Needs an initialised process group."""
    return _gather_rows_function().apply(tensor)


@functools.cache  # built on first use: importing this module must not import torch (`--help` stays fast)
def _gather_rows_function() -> type:
    import torch
    import torch.distributed as dist

    class GatherRows(torch.autograd.Function):
        """forward: all-gather the ranks' rows, this rank's own tensor in its slot. backward: rank r's
        loss L_r reaches the rows of every rank, so the gradient of rank s's rows is the sum over r
        of dL_r/d(rows of s): all-reduce (sum) the incoming gradient, keep this rank's slice. No
        other factor: DDP then averages the parameters' gradients over the W ranks, which gives the
        gradient of mean_r L_r, the one-process loss when each L_r is the mean over rank r's rows."""

        @staticmethod
        def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
            rank, size = dist.get_rank(), dist.get_world_size()
            parts = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(parts, tensor.contiguous())
            parts[rank] = tensor
            ctx.rank, ctx.rows = rank, tensor.shape[0]
            return torch.cat(parts)

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous().clone()  # all_reduce works in place
            dist.all_reduce(grad)
            return grad.narrow(0, ctx.rank * ctx.rows, ctx.rows)

    return GatherRows


def check_batch_split(batch_size: int, n: int, world: World) -> None:
    """train.batch_size is the global batch: each step's pairs must split evenly over the ranks."""
    batch = min(batch_size, n)  # fewer training pairs than batch_size make one batch of them all
    if batch % world.size:
        raise ConfigError(f"train.batch_size is the global batch, split evenly over the processes: {batch} pairs per step "
                          f"do not divide by {world.size} processes; use a multiple of {world.size}")
