"""Concurrent requests' database work done together: many callers, one query or one transaction.

A caller hands `Coalescer` one item and awaits its own result. While fewer than `lanes` batches
are in flight its item starts one at once; otherwise it waits, and the next batch takes it with
every other item that came meanwhile. No timer: an idle server handles an item as soon as it
comes, a busy one in batches as large as its load makes them, so batching costs a request at most
the batch in flight before its own."""
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import psycopg

from schemas.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# `handle` answers a batch with one result per item, in order; an exception in that list is that
# item's error, one raised is every item's.
Handler = Callable[[list[T]], Awaitable[list[R | BaseException]]]


class Coalescer(Generic[T, R]):
    def __init__(self, handle: Handler, *, lanes: int = 1, max_batch: int = 64):
        self.handle, self.lanes, self.max_batch = handle, lanes, max_batch
        self._waiting: list[tuple[T, asyncio.Future]] = []
        self._running: set[asyncio.Task] = set()  # held: a task nobody holds may be collected
        self.batches = self.items = 0  # how many of each were handled (for tests and benches)

    async def __call__(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._running) < self.lanes:
            self._start()
        # A caller that gives up (its client left) leaves its item in the batch: the batch's
        # outcome is the same for the others, and nobody is told it succeeded.
        return await future

    def _start(self) -> None:
        batch, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._finished)

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            results = await self.handle([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.handle!r} answered {len(results)} of {len(batch)} items")
        except Exception as e:  # every item's: each caller raises it
            results = [e] * len(batch)
        except asyncio.CancelledError:  # shutting down: no caller is left waiting for ever
            for _, future in batch:
                future.cancel()
            raise
        self.batches, self.items = self.batches + 1, self.items + len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():  # its caller gave up
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:  # a bug in _run itself: say so
            log.error("a coalesced batch failed", exc_info=task.exception())
        if self._waiting and len(self._running) < self.lanes:
            self._start()

    async def wait(self) -> None:
        """Until every batch under way, and every item waiting, is handled (at shutdown)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def rolled_back(error: Exception) -> bool:
    """The server reported the error (it has a SQLSTATE, or aborted the pipeline after one), so it
    ended the transaction without committing it: safe to write the group's items again. A lost
    connection reports nothing."""
    cause = error if isinstance(error, psycopg.Error) else error.__cause__
    return (not isinstance(error, Unavailable) or isinstance(cause, psycopg.errors.PipelineAborted)
            or getattr(cause, "sqlstate", None) is not None)


async def each_alone_if_refused(items: list[T], together: Handler, alone: Callable[[T], Awaitable[R | BaseException]],
                                what: str) -> list[R | BaseException]:
    """`together(items)`, one transaction; when the database refused it (it rolled back whole: a
    value it will not take, a deadlock), `alone(item)` for each, so only the item at fault fails.
    Anything else (a lost connection: the outcome unknown) is every item's error."""
    try:
        return await together(items)
    except Exception as e:
        if not rolled_back(e):
            raise
        log.warning("a group of %d %s failed (%s); writing each on its own", len(items), what, e)
    return [await alone(item) for item in items]
