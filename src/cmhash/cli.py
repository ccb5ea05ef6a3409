"""The `cmhash` command: one subcommand per pipeline stage, exactly what `dvc repro` runs."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from cmhash.config.choices.archs import ARCHS
from cmhash.config.choices.baselines import BASELINES
from cmhash.config.choices.datasets import DATASETS
from cmhash.config.choices.indexes import INDEXES
from cmhash.config.choices.losses import LOSSES
from cmhash.config.choices.optimizers import OPTIMIZERS
from cmhash.config.choices.schedules import SCHEDULES
from cmhash.errors import CmhashError, ConfigError
from cmhash.pipeline import baselines, evaluate, extract, prepare, report, train_fusion, train_hash
from cmhash.runtime.distributed import current_world
from cmhash.runtime.launch import DISTRIBUTED, one_process, self_launching
from cmhash.search import commands as search
from cmhash.serve.command import serve

app = typer.Typer(
    help="Unsupervised cross-modal hashing (UCMFH on CLIP features). Each command is one stage of "
    "dvc.yaml and reads its settings from params.yaml; options override paths only.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _one_line_errors(fn: Callable) -> Callable:
    """A mistake the user can fix is one line on stderr and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        world = current_world()
        prefix = f"error: rank {world.rank}: " if world.distributed else "error: "  # several ranks may each say why
        try:
            return fn(*args, **kwargs)
        except CmhashError as exc:
            typer.secho(f"{prefix}{exc}", fg="red", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a disk fault outside the atomic writers (they raise DiskError)
            typer.secho(f"{prefix}{exc.filename}: {exc.strerror}" if exc.filename else f"{prefix}{exc}", fg="red", err=True)
            raise typer.Exit(1) from None

    return wrapper


STAGES = {
    "prepare": prepare.command,
    "extract": extract.command,
    "baselines": baselines.command,
    "train-fusion": train_fusion.command,
    "train-hash": train_hash.command,
    "evaluate": evaluate.command,
    "report": report.command,
}
TOOLS = {"index": search.index, "search": search.search, "serve": serve}  # use trained codes; not dvc.yaml stages
for name, command in {**STAGES, **TOOLS}.items():
    app.command(name)(_one_line_errors(self_launching(command) if name in DISTRIBUTED else one_process(name, command)))

REGISTRIES = {"losses": LOSSES, "archs": ARCHS, "schedules": SCHEDULES, "datasets": DATASETS, "optimizers": OPTIMIZERS,
              "baselines": BASELINES, "indexes": INDEXES}


@app.command("list")
@_one_line_errors
def list_names(kind: Annotated[str, typer.Argument(help=f"one of: {', '.join(REGISTRIES)}.")]) -> None:
    """The names a params.yaml choice accepts (loss, model.arch, train.schedule.name, data.name,
    train.optimizer.name, baselines.methods), each with its knobs and their defaults."""
    if kind not in REGISTRIES:
        raise ConfigError(f"unknown list {kind!r}; choose one of: {', '.join(REGISTRIES)}")
    table = Table(box=None, show_header=False)
    for entry in REGISTRIES[kind].entries():
        knobs = entry.knobs().model_dump()
        table.add_row(entry.name, Text(", ".join(f"{k}={v}" for k, v in knobs.items()) or "-"), Text(entry.summary))
    Console().print(table)


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging.")) -> None:
    # open_clip logs its set-up at INFO on the root logger: keep that for --verbose only. Logs go to
    # stderr, so stdout holds only results (`cmhash search --json | jq` works).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)], force=True)
    logging.getLogger("cmhash").setLevel(logging.DEBUG if verbose else logging.INFO)
