"""How a command starts when it may run in several processes (torchrun): the stages that run
distributed (DISTRIBUTED) start themselves under torch's elastic launcher when their params ask for
`distributed.nproc_per_node` > 1, and join the process group when torchrun started them; every
other command refuses to run in several processes."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import typer

from cmhash.config.schema import Params, load_params
from cmhash.errors import ConfigError
from cmhash.runtime.distributed import World, check_batch_split, current_world, process_group, relaunch, under_launcher

DISTRIBUTED = {"extract", "train-fusion", "train-hash"}  # the stages that run in several processes


def _batch_splits(p: Params, processes: int) -> None:
    check_batch_split(p.train.batch_size, p.train.batch_size, World(size=processes))


# What a stage can check on its params alone before it starts its processes.
BEFORE_LAUNCH: dict[str, Callable[[Params, int], None]] = {"train-fusion": _batch_splits, "train-hash": _batch_splits}


def self_launching(fn: Callable) -> Callable:
    """A stage that can run in several processes: when its params ask for
    `distributed.nproc_per_node` > 1 and torchrun did not start it, it starts itself that way."""

    @functools.wraps(fn)
    def wrapper(ctx: typer.Context, **kwargs):
        p = load_params(kwargs["params"])
        if p.distributed.nproc_per_node > 1 and not under_launcher():
            if ctx.info_name in BEFORE_LAUNCH:  # said once here, not once by every rank
                BEFORE_LAUNCH[ctx.info_name](p, p.distributed.nproc_per_node)
            return relaunch(p.distributed, command_line(ctx))
        world = current_world()
        if not world.distributed:
            return fn(**kwargs)
        from cmhash.runtime.device import resolve_device

        rank_logs(world.rank)
        with process_group(p.distributed, resolve_device(p.device).type):
            return fn(**kwargs)

    # Typer hands its context to a parameter annotated typer.Context: the command's parameters plus that one.
    signature = inspect.signature(fn, eval_str=True)
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), context])
    return wrapper


def one_process(name: str, fn: Callable) -> Callable:
    """A command that runs in one process refuses to run under torchrun in several: each would do
    all of the work and write the same outputs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        world = current_world()
        if world.distributed:
            raise ConfigError(f"`cmhash {name}` runs in one process, not {world.size}: run it without torchrun "
                              f"(only {', '.join(sorted(DISTRIBUTED))} run in several)")
        return fn(*args, **kwargs)

    return wrapper


def rank_logs(rank: int) -> None:
    """Every rank logs to the same terminal: each line names its rank, and the ranks other than 0
    (which reports for the job) keep to warnings unless --verbose."""
    cmhash_log = logging.getLogger("cmhash")
    if rank != 0 and cmhash_log.level == logging.INFO:
        cmhash_log.setLevel(logging.WARNING)

    def label(record: logging.LogRecord) -> bool:
        record.msg = f"rank {rank}: {record.msg}"
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(label)


def command_line(ctx: typer.Context) -> list[str]:
    """This command and its options as given (defaults included), for the worker processes."""
    args = ["--verbose"] if ctx.parent is not None and ctx.parent.params.get("verbose") else []
    args.append(ctx.info_name)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, list | tuple) else [] if value is None else [value]:
            args += [param.opts[0], str(item)]
    return args
