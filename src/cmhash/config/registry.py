"""One registry pattern for every named choice in params.yaml: losses, fusion architectures, lr
schedules, datasets and optimisers (`cmhash.config.choices`).

An entry is a name, its knobs - a config section (a pydantic model whose fields all have
defaults) that becomes `<section>.<name>` in params.yaml - and where its implementation lives
("module:attribute", imported on first use). The knobs are declared apart from the
implementation so that checking params.yaml never imports torch: a config mistake is reported
in a fraction of a second, and code that only checks settings is not a stage's code dependency.
Adding a loss or an architecture is its implementation plus its entry plus its params.yaml
section; the schema, the messages and `cmhash list` follow from the registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cmhash.config.fields import Section
from cmhash.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    knobs: type[Section]  # the entry's own section; Section itself when it has no knobs
    impl: str  # "module:attribute" of the implementation
    summary: str  # one line, for `cmhash list`
    meta: dict[str, Any] = field(default_factory=dict)  # anything else the registry's users need

    def load(self) -> Any:
        module, _, attribute = self.impl.partition(":")
        return getattr(importlib.import_module(module), attribute)


class Registry:
    """Named entries of one kind (`kind` names it in messages: "unknown loss 'x'; ...")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, impl: str, knobs: type[Section] = Section, summary: str = "", **meta: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = Entry(name, knobs, impl, summary, meta)

    def register(self, name: str, impl: str, **meta: Any) -> Callable[[type[Section]], type[Section]]:
        """Decorator on a knobs section: `@LOSSES.register("infonce", "cmhash.losses:InfoNCELoss")`.
        The section's docstring (first line) is the entry's summary."""

        def add(knobs: type[Section]) -> type[Section]:
            doc = (knobs.__doc__ or "").strip().splitlines()
            self.add(name, impl, knobs, doc[0] if doc else "", **meta)
            return knobs

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[name] for name in self.names()]

    def unknown(self, name: Any) -> str:
        """The one message format for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"

    def validate(self, name: str) -> str:
        """For pydantic validators: the name, or ValueError with `unknown`'s message."""
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return name

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(self.unknown(name))
        return self._entries[name]

    def __getitem__(self, name: str) -> Any:
        """The implementation registered as `name`."""
        return self.entry(name).load()

    def __len__(self) -> int:
        return len(self._entries)
