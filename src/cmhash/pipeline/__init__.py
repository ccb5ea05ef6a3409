"""One module per pipeline stage. Each holds the stage's Typer `command` (its inputs, outputs and
options) and the `run` function it calls; `cmhash.cli` only registers them."""

from pathlib import Path
from typing import Annotated

import typer

ParamsOption = Annotated[Path, typer.Option("--params", help="params file to read every setting from.")]
