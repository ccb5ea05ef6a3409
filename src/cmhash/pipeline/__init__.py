"""One module per pipeline stage (a dvc.yaml stage). Each holds the stage's Typer `command` (its
inputs, outputs and options), `reads` (the params.yaml keys it reads: dvc.yaml lists exactly
these) and the `run` function that does its I/O around calls into the library. `cmhash.cli`
only registers the commands.

A stage module imports only light modules at the top (typer, the config); the library (torch,
open_clip, numpy) is imported inside `run`. So `--help` and a mistake in params.yaml answer in
a fraction of a second instead of after loading torch."""
