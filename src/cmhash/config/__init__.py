"""params.yaml as one typed, frozen configuration, checked when a command starts. Pure config:
nothing here imports torch, so a mistake in params.yaml is reported in a fraction of a second.

schema.py    the whole params.yaml: its sections, `load_params`, and each stage's settings
fields.py    the `Section` base and the value types fields use (Count, Probability, ...)
registry.py  the one registry pattern every named choice uses
choices/     the registries: losses, architectures, schedules, optimisers, datasets, baselines
options.py   Typer options that several commands share
"""
