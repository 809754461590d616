"""Group commit for the gateway's blocking database calls.

A :class:`GroupRunner` runs one blocking function over a list of items on a worker thread,
one batch at a time: a call made while a batch is running waits for the next one, which
takes everything that queued meanwhile. With one caller it is a plain thread hop; with many
concurrent requests they share one connection checkout, one transaction and one thread hop
instead of each paying for their own (docs/decisions.md, "Database calls are grouped").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from fastapi.concurrency import run_in_threadpool

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["GroupRunner"]


class GroupRunner(Generic[T, R]):
    """``await runner(item)`` is ``run_batch([... item ...])[i]``, batched with the calls
    made while an earlier batch ran (at most ``max_batch`` in one).

    ``run_batch`` returns one entry per item, in order: a result, or an exception raised to
    that item's caller alone; an exception it raises itself goes to every caller of the
    batch. A caller that is cancelled does not take its item out of a batch already running
    (a write it asked for still happens)."""

    def __init__(
        self, run_batch: Callable[[list[T]], Sequence[R | BaseException]], max_batch: int = 64
    ) -> None:
        self.run_batch = run_batch
        self.max_batch = max_batch
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._queued.append((item, done))
        if self._draining is None or self._draining.get_loop() is not loop:
            self._draining = loop.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queued:
                batch = self._queued[: self.max_batch]
                del self._queued[: self.max_batch]
                try:
                    results = await run_in_threadpool(self.run_batch, [item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} results for {len(batch)} items")
                except Exception as exc:  # every caller of the batch gets it
                    results = [exc] * len(batch)
                for (_, done), result in zip(batch, results, strict=True):
                    if done.done():  # its caller was cancelled
                        continue
                    if isinstance(result, BaseException):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
        except BaseException:  # cancelled with the loop: so are its callers
            for _, done in batch + self._queued:
                done.cancel()
            self._queued.clear()
            raise
        finally:
            if self._draining is asyncio.current_task():
                self._draining = None
