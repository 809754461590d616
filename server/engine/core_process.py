"""The engine core in a process of its own, as vLLM's engine core runs: the gateway's event
loop and the step loop then never wait for one interpreter's lock.

The child process owns an :class:`LLMEngine` and runs its step loop; between steps it applies
the commands the gateway sent (add, abort, load a version, stop) and after each step sends the
step's deltas back, with the engine's waiting count and, a few times a second, its stats. On
the gateway side (:class:`ProcessEngine`) a writer thread sends the commands, so a busy child
never blocks the event loop, and a reader thread hands what comes back to the loop, a batch of
messages per wake-up. Each direction is a pipe of its own, read and written with blocking
calls (an fd the event loop watched would be made non-blocking by uvloop, and a large message
could then be read half). Both ends speak pickled tuples.

Admission is checked on the gateway side with what the child reported (the waiting queue, the
context length and the KV pool of the version serving new requests), so an overloaded engine
refuses a request at submission, as the in-process engine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from server.engine.async_engine import RequestStream
from server.engine.config import EngineConfig
from server.engine.llm_engine import EngineOverloaded, LLMEngine, build_worker, check_admission
from server.engine.outputs import AsyncClosing, Delta
from server.engine.sampling import SamplingParams
from server.engine.stats import EngineStats
from shared.checkpoints import CheckpointError, Policy, PolicyRegistry
from shared.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATS_EVERY_S = 0.25  # how often a busy child sends its stats (the metrics' scrape reads them)
IDLE_WAIT_S = 0.05
READ_BATCH = 64  # messages the reader hands to the event loop at most in one callback
START_TIMEOUT_S = 300.0  # spawning imports torch and loads the policy: slow on a small CPU

# exceptions that cross the pipe keep their type (the API maps them to 429, 400, 503)
_ERRORS: dict[str, type[Exception]] = {
    "EngineOverloaded": EngineOverloaded,
    "ValueError": ValueError,
}


@dataclass(frozen=True)
class PolicyInfo:
    """What the gateway needs of the version serving new requests."""

    version: str
    max_seq_len: int
    kv_blocks: int
    block_size: int


def _info(engine: LLMEngine) -> PolicyInfo:
    worker = engine.current
    return PolicyInfo(
        engine.version,
        worker.policy.config.max_seq_len,
        worker.blocks.num_blocks,
        worker.blocks.block_size,
    )


def _wire_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, CheckpointError):
        return "CheckpointError", f"{exc.version}\0{exc.reason}\0{exc.file or ''}"
    name = type(exc).__name__
    return (name if name in _ERRORS else "RuntimeError"), str(exc)


def _from_wire(name: str, message: str) -> Exception:
    if name == "CheckpointError":
        version, reason, file = message.split("\0")
        return CheckpointError(version, reason, file or None)
    return _ERRORS.get(name, RuntimeError)(message)


def _light_stats(engine: LLMEngine) -> EngineStats:
    stats = engine.stats()
    stats.recent.clear()  # the gateway times requests from their final deltas
    return stats


# -- the child ------------------------------------------------------------------------------
def _core_main(
    commands: Connection, events: Connection, root: str, version: str | None, config: EngineConfig
) -> None:
    """The child process: build the engine, say ready, then step and serve ``commands`` until
    told to stop or the gateway goes away; what it has to say goes to ``events``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(message)s")
    try:
        engine = LLMEngine.from_registry(PolicyRegistry(Path(root)), version, config)
    except Exception as exc:
        events.send(("failed", *_wire_error(exc)))
        return
    events.send(("ready", _info(engine), _light_stats(engine)))
    applied = 0  # sequences of the add commands applied so far
    last_stats = 0.0
    changed = False  # anything since the stats last sent
    loader = ThreadPoolExecutor(1, thread_name_prefix="palmchat-core-loader")
    loading: dict[int, Future[Policy]] = {}  # load calls -> the version being read
    besides: dict[int, bool] = {}  # load calls -> whether it is served beside the current one
    while True:
        busy = engine.has_work()
        out: list[Any] = []
        try:
            while commands.poll(0 if busy else IDLE_WAIT_S):
                message = commands.recv()
                kind = message[0]
                if kind == "stop":
                    return
                if kind == "add":
                    _, request_id, prompt, params, version = message
                    applied += params.n
                    try:
                        engine.add_request(prompt, params, request_id, version)
                    except Exception as exc:
                        out.append(("error", request_id, *_wire_error(exc)))
                elif kind == "abort":
                    out.append(("deltas", engine.abort(message[1])))
                elif kind == "load":
                    _, call, wanted, beside = message
                    if wanted == engine.version or engine.reuse_worker(wanted, beside=beside):
                        out.append(("reply", call, None, _info(engine)))
                    else:  # read and verify off the step loop, as the in-process front does
                        loading[call] = loader.submit(engine.load_verified, wanted)
                        besides[call] = beside
                elif kind == "release":
                    engine.release(message[1])
                busy = changed = True
            for call, future in list(loading.items()):
                if future.done():
                    del loading[call]
                    try:  # the worker is built here, between two steps
                        engine.add_worker(
                            build_worker(future.result(), engine.config), beside=besides.pop(call)
                        )
                        out.append(("reply", call, None, _info(engine)))
                    except Exception as exc:
                        out.append(("reply", call, _wire_error(exc), None))
                    changed = True
        except (EOFError, OSError):  # the gateway is gone
            return
        deltas: list[Delta] = []
        if engine.has_work():
            changed = True
            try:
                deltas = engine.step()
            except Exception as exc:  # a bug or a device error: fail what is in flight
                log.exception("engine step failed")
                for request_id in list(engine.requests):
                    engine.abort(request_id)
                    out.append(("error", request_id, *_wire_error(exc)))
        now = time.monotonic()
        stats = None
        if changed and (now - last_stats >= STATS_EVERY_S or not engine.has_work()):
            stats, last_stats, changed = _light_stats(engine), now, False
        if deltas or out or stats is not None:
            try:
                events.send(("step", deltas, out, engine.num_waiting, applied, stats))
            except (EOFError, OSError):
                return


# -- the gateway's side ---------------------------------------------------------------------
class ProcessEngine(AsyncClosing):
    """The :class:`~server.api.serving.Backend` calls, served by an engine core process.

    Create it with :meth:`start` from the event loop that will use it."""

    def __init__(self, registry: PolicyRegistry, config: EngineConfig | None = None) -> None:
        self.registry = registry
        self.config = config or EngineConfig()
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # id -> (stream, open)
        self._calls: dict[int, asyncio.Future[PolicyInfo]] = {}
        self._ids = itertools.count()
        self._sent = 0  # sequences of the add commands sent so far
        self._applied = 0  # ... and applied by the child, as of its latest message
        self._waiting = 0
        self._beside: set[str] = set()  # versions the child serves beside the current one
        self._stats = EngineStats()
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._dead: Exception | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, version: str | None = None) -> ProcessEngine:
        """Spawn the core on ``version`` (default: the newest) and wait until it serves."""
        ctx = mp.get_context("spawn")  # no fork: the gateway has threads and torch state
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._events, child_events = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_core_main,
            args=(child_commands, child_events, str(self.registry.root), version, self.config),
            name="palmchat-engine-core",
            daemon=True,
        )
        self._proc.start()
        child_commands.close()
        child_events.close()
        ready = await asyncio.wait_for(asyncio.to_thread(self._events.recv), START_TIMEOUT_S)
        if ready[0] == "failed":
            self._proc.join(timeout=10)
            raise _from_wire(ready[1], ready[2])
        _, self._info, self._stats = ready
        self._tokenizer = await asyncio.to_thread(self.registry.tokenizer, self._info.version)
        self._loop = asyncio.get_running_loop()
        for target, name in ((self._write, "writer"), (self._read, "reader")):
            threading.Thread(target=target, name=f"palmchat-core-{name}", daemon=True).start()
        return self

    # -- the Backend calls ----------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._info.version

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self._info.max_seq_len

    def stats(self) -> EngineStats:
        return self._stats

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        version: str | None = None,
    ) -> RequestStream:
        """Queue a request on ``version`` (None: the current one), from the event loop
        :meth:`start` ran on. Raises :class:`EngineOverloaded` when the waiting queue is full
        and ``ValueError`` for a prompt the engine cannot take or a version it does not
        serve, as the in-process engine does."""
        params = params or SamplingParams()
        if self._dead is not None:
            raise RuntimeError(f"the engine core is not running: {self._dead}")
        if version == self.version:
            version = None
        if version is not None and version not in self._beside:
            raise ValueError(f"policy {version} is not being served")
        prompt = list(prompt_ids)
        info = self._info
        check_admission(
            len(prompt),
            self._waiting + self._sent - self._applied,
            self.config.max_waiting,
            info.max_seq_len,
            info.kv_blocks,
            info.block_size,
        )
        request_id = request_id or f"preq-{next(self._ids)}"
        stream = RequestStream(self, request_id, params.n)
        self._streams[request_id] = (stream, params.n)
        self._sent += params.n
        self._outbox.put(("add", request_id, prompt, params, version))
        return stream

    def abort(self, request_id: str) -> None:
        if request_id in self._streams and self._dead is None:
            self._outbox.put(("abort", request_id))

    async def load_policy(self, version: str, *, beside: bool = False) -> str:
        """Serve ``version`` to new requests, or with ``beside`` only to requests that name it
        (the child loads and verifies it between steps; ``CheckpointError`` if it fails, and
        the current version stays)."""
        if version == self.version:
            return version
        if self._dead is not None:
            raise RuntimeError(f"the engine core is not running: {self._dead}")
        assert self._loop is not None
        call = next(self._ids)
        done: asyncio.Future[PolicyInfo] = self._loop.create_future()
        self._calls[call] = done
        self._outbox.put(("load", call, version, beside))
        info = await done
        if beside:
            self._beside.add(version)
            return version
        self._beside.discard(version)
        # the tokenizer is read here, off the loop
        self._tokenizer = await asyncio.to_thread(self.registry.tokenizer, info.version)
        self._info = info
        return info.version

    @property
    def serving_beside(self) -> frozenset[str]:
        return frozenset(self._beside)

    async def release(self, version: str) -> None:
        """Stop serving ``version`` beside the current one; requests on it finish first."""
        self._beside.discard(version)
        if self._dead is None:
            self._outbox.put(("release", version))

    async def aclose(self) -> None:
        self._closing = True
        await asyncio.to_thread(self.shutdown)
        self._gone(RuntimeError("the engine core was shut down"))

    def shutdown(self) -> None:
        """Stop the child (from any thread; :meth:`aclose` also fails what is still open)."""
        self._outbox.put(("stop",))
        self._outbox.put(None)
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    # -- the pipe ---------------------------------------------------------------------------
    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._commands.send(message)
            except (OSError, ValueError):  # the child is gone; the reader reports it
                return

    def _read(self) -> None:
        """The reader thread: block on the child's pipe and hand each batch to the loop."""
        assert self._loop is not None
        loop = self._loop
        while True:
            try:
                batch = [self._events.recv()]
                while len(batch) < READ_BATCH and self._events.poll():
                    batch.append(self._events.recv())
            except (EOFError, OSError):  # the child exited
                if self._closing:  # stopped: aclose fails what is still open
                    return
                self._proc.join(timeout=5)
                exc = RuntimeError(f"the engine core exited (code {self._proc.exitcode})")
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                    loop.call_soon_threadsafe(self._gone, exc)
                return
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._dispatch_all, batch)

    def _dispatch_all(self, batch: list[tuple[Any, ...]]) -> None:
        for message in batch:
            self._dispatch(message)

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        _, deltas, out, waiting, applied, stats = message
        self._waiting, self._applied = waiting, applied
        if stats is not None:
            self._stats = stats
        grouped: dict[str, list[Delta | BaseException]] = defaultdict(list)
        for d in deltas:
            grouped[d.request_id].append(d)
        for item in out:
            if item[0] == "deltas":
                for d in item[1]:
                    grouped[d.request_id].append(d)
            elif item[0] == "error":
                grouped[item[1]].append(_from_wire(item[2], item[3]))
            elif item[0] == "reply":
                done = self._calls.pop(item[1], None)
                if done is not None and not done.done():
                    if item[2] is None:
                        done.set_result(item[3])
                    else:
                        done.set_exception(_from_wire(*item[2]))
        for request_id, items in grouped.items():
            entry = self._streams.get(request_id)
            if entry is None:
                continue
            stream, still_open = entry
            for x in items:
                stream._put(x)
                if isinstance(x, BaseException):
                    still_open = 0
                elif x.finished:
                    still_open -= 1
            if still_open <= 0:
                del self._streams[request_id]
            else:
                self._streams[request_id] = (stream, still_open)

    def _gone(self, exc: Exception) -> None:
        """The child is gone: every open stream and pending call fails with ``exc`` (on the
        event loop)."""
        if self._dead is None:
            self._dead = exc
        for stream, _ in self._streams.values():
            stream._put(exc)
        self._streams.clear()
        for done in self._calls.values():
            if not done.done():
                done.set_exception(exc)
        self._calls.clear()


__all__ = ["ProcessEngine"]
