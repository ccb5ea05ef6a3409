"""`python -m cmhash <command>`: the same as the `cmhash` command."""

from cmhash.cli import app

app(prog_name="cmhash")
