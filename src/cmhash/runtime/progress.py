"""Rich progress bars with an items/s column, for anything that takes more than a few seconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


def rate_text(speed: float | None, unit: str) -> str:
    """`1,234 pair/s`, or `12.3 s/epoch` when one item takes more than a second."""
    if not speed:
        return ""
    return f"{speed:,.0f} {unit}/s" if speed >= 1 else f"{1 / speed:,.1f} s/{unit}"


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(rate_text(task.finished_speed or task.speed, task.fields.get("unit", "it")))


@contextmanager
def progress_bar(description: str, total: int, unit: str = "it") -> Iterator[_Advance]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(), _Rate(), TimeRemainingColumn())
    # stderr, like the logs: stdout holds only results (`cmhash search --json | jq`, `| head`)
    with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total, unit=unit)
        yield _Advance(progress, task)


class _Advance:
    def __init__(self, progress: Progress, task) -> None:
        self._progress, self._task = progress, task

    def __call__(self, n: int = 1, **fields) -> None:
        self._progress.update(self._task, advance=n, **fields)
