"""Shared by the benchmarks (run as `python benchmarks/<bench>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest of `repeats` runs (the least disturbed by other work) and the last run's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result
