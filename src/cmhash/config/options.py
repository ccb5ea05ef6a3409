"""Typer options that several commands share."""

from pathlib import Path
from typing import Annotated

import typer

ParamsOption = Annotated[Path, typer.Option("--params", help="params file to read every setting from.")]
