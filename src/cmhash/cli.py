"""The `cmhash` command: one subcommand per pipeline stage, exactly what `dvc repro` runs."""

from __future__ import annotations

import functools
import logging
from typing import Callable

import typer
from rich.console import Console
from rich.logging import RichHandler

from cmhash.errors import CmhashError
from cmhash.pipeline import evaluate, extract, prepare, train_fusion, train_hash
from cmhash.search import commands as search

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
        try:
            return fn(*args, **kwargs)
        except CmhashError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(1) from None

    return wrapper


STAGES = {
    "prepare": prepare.command,
    "extract": extract.command,
    "train-fusion": train_fusion.command,
    "train-hash": train_hash.command,
    "evaluate": evaluate.command,
}
TOOLS = {"index": search.index, "search": search.search}  # use trained codes; not dvc.yaml stages
for name, command in {**STAGES, **TOOLS}.items():
    app.command(name)(_one_line_errors(command))


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging.")) -> None:
    # open_clip logs its set-up at INFO on the root logger: keep that for --verbose only. Logs go to
    # stderr, so stdout holds only results (`cmhash search --json | jq` works).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)], force=True)
    logging.getLogger("cmhash").setLevel(logging.DEBUG if verbose else logging.INFO)
