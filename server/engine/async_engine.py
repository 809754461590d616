"""The asyncio front: one background thread runs the step loop; each request gets an async
iterator of :class:`Delta`.

Calls from the event loop never touch the engine directly: they enqueue commands (add, abort,
swap) that the engine thread applies between steps, and the thread hands each step's deltas
back with one ``call_soon_threadsafe`` per event loop. Closing or abandoning a stream (the
client went away) aborts its request, which frees its blocks at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

from server.engine.llm_engine import EngineOverloaded, LLMEngine, build_worker
from server.engine.outputs import AsyncClosing, Delta, DeltaStream
from server.engine.sampling import SamplingParams
from server.engine.stats import EngineStats
from shared.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Aborts(Protocol):
    def abort(self, request_id: str) -> None: ...


class RequestStream(DeltaStream):
    """One request's deltas, through an asyncio queue that the engine's front fills (the
    engine thread's, or the reader of an engine core process); cancelling aborts it there."""

    def __init__(self, engine: Aborts, request_id: str, n: int) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._open = n
        self._closed = False

    async def __anext__(self) -> Delta:
        if self._open == 0:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._open = 0
            raise item
        if item.finished:
            self._open -= 1
        return item

    def cancel(self) -> None:
        """Stop generating: the request is freed at the next step."""
        if self._open and not self._closed:
            self._closed = True
            self._engine.abort(self.request_id)

    def _put(self, item: Delta | BaseException) -> None:
        self._queue.put_nowait(item)


class AsyncEngine(AsyncClosing):
    def __init__(self, engine: LLMEngine, *, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._pending = 0  # sequences submitted but not yet applied by the engine thread
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stats = engine.stats()
        self._waiting = 0  # the engine's waiting sequences, as of its latest change
        self._stop = False
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._loop, name="palmchat-engine", daemon=True)
        self._thread.start()

    # -- requests ---------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        version: str | None = None,
    ) -> RequestStream:
        """Queue a request on ``version`` (None: the current one); iterate the returned stream
        for its deltas. Must be called from a running event loop. Raises
        :class:`EngineOverloaded` when the waiting queue is full (counting requests submitted
        but not yet queued) and ``ValueError`` for a prompt the engine cannot take or a
        version it does not serve."""
        params = params or SamplingParams()
        if self._stop:
            raise RuntimeError("the engine is shut down")
        prompt = list(prompt_ids)
        with self._lock:
            self.engine.check_admission(len(prompt), self._waiting + self._pending, version)
            self._pending += params.n
        request_id = request_id or f"areq-{next(self._ids)}"
        stream = RequestStream(self, request_id, params.n)
        self._streams[request_id] = (asyncio.get_running_loop(), stream)

        def add() -> None:
            try:
                self.engine.add_request(prompt, params, request_id, version)
            except Exception as exc:  # overloaded or invalid: the stream raises it
                self._deliver({request_id: [exc]})
            finally:
                with self._lock:
                    self._pending -= params.n
                    self._waiting = self.engine.num_waiting

        self._submit(add)
        return stream

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._deliver(self._group(self.engine.abort(request_id))))

    # -- policies ---------------------------------------------------------------------------
    async def load_policy(self, version: str, *, beside: bool = False) -> str:
        """Load and verify ``version`` off the loop thread, then make it serve new requests
        (with ``beside``: only requests that name it, :meth:`LLMEngine.load_policy`). A
        version that fails verification raises ``CheckpointError``; the current one stays."""
        if version == self.engine.version:
            return version
        if await self._on_loop(lambda: self.engine.reuse_worker(version, beside=beside)):
            return version
        # Reading and verifying the files happens off the loop; building the worker (dtype and
        # layout changes, KV pool allocation) happens on the engine thread between two steps,
        # so no tensor work of the new policy ever runs alongside a step of the old one.
        policy = await asyncio.to_thread(self.engine.load_verified, version)
        await self._on_loop(
            lambda: self.engine.add_worker(build_worker(policy, self.engine.config), beside=beside)
        )
        return version

    async def release(self, version: str) -> None:
        """Stop serving ``version`` beside the current one (:meth:`LLMEngine.release`)."""
        await self._on_loop(lambda: self.engine.release(version))

    async def _on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and return its result."""
        done: Future[Any] = Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except Exception as exc:
                done.set_exception(exc)

        self._submit(call)
        return await asyncio.wrap_future(done)

    @property
    def version(self) -> str:
        return self.engine.version

    @property
    def serving_beside(self) -> frozenset[str]:
        return frozenset(self.engine.beside)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the version that serves new requests."""
        return self.engine.current.policy.tokenizer

    @property
    def max_seq_len(self) -> int:
        """The context length of the version that serves new requests."""
        return self.engine.current.policy.config.max_seq_len

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step."""
        return self._stats

    # -- the loop ---------------------------------------------------------------------------
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop:
            self._wake.clear()  # before reading commands: a later submit wakes the wait below
            self._apply_commands()
            with self._lock:
                self._waiting = self.engine.num_waiting
            if not self.engine.has_work():
                self._stats = self.engine.stats()
                self._wake.wait(self._idle_wait_s)
                continue
            try:
                deltas = self.engine.step()
            except Exception as exc:  # a bug or a device error: fail in-flight requests
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            self._stats = self.engine.stats()
            with self._lock:
                self._waiting = self._stats.waiting
            self._deliver(self._group(deltas))

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    @staticmethod
    def _group(deltas: list[Delta]) -> dict[str, list[Any]]:
        grouped: dict[str, list[Any]] = defaultdict(list)
        for d in deltas:
            grouped[d.request_id].append(d)
        return grouped

    def _deliver(self, grouped: dict[str, list[Any]]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for request_id, items in grouped.items():
            entry = self._streams.get(request_id)
            if entry is None:
                continue
            loop, stream = entry
            per_loop.setdefault(loop, []).extend((stream, item) for item in items)
            if any(isinstance(i, BaseException) for i in items) or (
                request_id not in self.engine.requests
            ):
                self._streams.pop(request_id, None)
        for loop, items in per_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens
                loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver({request_id: [exc]})

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    async def aclose(self) -> None:
        self.shutdown()


def _put_all(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream._put(item)


__all__ = ["AsyncEngine", "EngineOverloaded", "RequestStream"]
