"""How the server hands queries to the Searcher: one at a time (`--batch 1`), or micro-batched.

A micro-batch is the queries that arrive while the first of them waits, at most `wait_ms` from its
arrival, up to `size` queries: Searcher.answer encodes them as one batch and searches them as one
batch per k, in one worker thread. A query alone is so delayed by at most `wait_ms`; queries that
arrive while a batch is being answered wait for it (as they waited for the encoder's lock without
batching) and go into the next one without further waiting when their wait has passed. Each
answer is the one the query gets alone (Searcher.answer), so batching changes only the timing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from cmhash.search.engine import Query, Searcher
from cmhash.serve.limits import Batching


class Answerer(Protocol):
    async def ask(self, query: Query) -> dict[str, Any]: ...

    def close(self) -> None: ...


def answerer(searcher: Searcher, batching: Batching) -> Answerer:
    return Unbatched(searcher) if batching.size == 1 else MicroBatcher(searcher, batching.size, batching.wait_ms / 1000)


class Unbatched:
    """Each query in a worker thread of its own, through the encoder one at a time (the Searcher's lock)."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher

    async def ask(self, query: Query) -> dict[str, Any]:
        return (await run_in_threadpool(self.searcher.answer, [query]))[0]

    def close(self) -> None:
        """Nothing to stop."""


class MicroBatcher:
    def __init__(self, searcher: Searcher, size: int, wait_s: float) -> None:
        self.searcher, self.size, self.wait_s = searcher, size, wait_s
        self._queue: queue.SimpleQueue[tuple[float, Query, concurrent.futures.Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cmhash-batcher", daemon=True)
        self._thread.start()

    async def ask(self, query: Query) -> dict[str, Any]:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((time.monotonic(), query, future))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Answer what is queued, then stop the worker thread (none is left running at exit)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping and (first := self._queue.get()) is not None:
            batch, deadline = [first], first[0] + self.wait_s
            while len(batch) < self.size:
                left = deadline - time.monotonic()
                try:
                    queued = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    stopping = True
                    break
                batch.append(queued)
            self._answer([(query, future) for _, query, future in batch])

    def _answer(self, batch: list[tuple[Query, concurrent.futures.Future]]) -> None:
        live = [(query, future) for query, future in batch if future.set_running_or_notify_cancel()]  # not given up by its client
        if not live:
            return
        try:
            answers = self.searcher.answer([query for query, _ in live])
        except Exception as exc:  # a fault, not a bad query (those are refused before they queue): each client gets it
            for _, future in live:
                future.set_exception(exc)
            return
        for (_, future), found in zip(live, answers):
            future.set_result(found)
