"""Group commit (``server.api.batching.GroupRunner``): calls made while a batch runs go
together in the next one; each caller gets its own result or error."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.api.batching import GroupRunner


async def test_calls_made_during_a_batch_go_together_in_the_next() -> None:
    batches: list[list[int]] = []
    release = threading.Event()

    def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        if len(batches) == 1:
            release.wait(5)  # the first batch is slow: the others queue behind it
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    runner: GroupRunner[int, int] = GroupRunner(run, max_batch=4)
    first = asyncio.ensure_future(runner(0))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(runner(i)) for i in range(1, 7)]
    await asyncio.sleep(0.05)
    release.set()
    assert await first == 0
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert [r if isinstance(r, int) else str(r) for r in results] == [
        "odd 1", 20, "odd 3", 40, "odd 5", 60
    ]  # fmt: skip


async def test_a_failing_batch_fails_every_caller_and_the_runner_goes_on() -> None:
    fail = True

    def run(items: list[str]) -> list[str | BaseException]:
        if fail:
            raise ConnectionError("database down")
        return [s.upper() for s in items]

    runner: GroupRunner[str, str] = GroupRunner(run)
    results = await asyncio.gather(runner("a"), runner("b"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    fail = False
    assert await asyncio.gather(runner("c"), runner("d")) == ["C", "D"]


async def test_a_cancelled_caller_does_not_stop_its_batch() -> None:
    done: list[str] = []
    started = threading.Event()

    def run(items: list[str]) -> list[str | BaseException]:
        started.set()
        threading.Event().wait(0.2)
        done.extend(items)
        return items

    runner: GroupRunner[str, str] = GroupRunner(run)
    call = asyncio.ensure_future(runner("write me"))
    await asyncio.to_thread(started.wait, 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await runner("next") == "next"  # runs after the first batch finished
    assert done == ["write me", "next"]
