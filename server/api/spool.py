"""Durable write spool: conversation logs and feedback that must survive a database outage.

The API acknowledges a thumb, a ranking or a finished completion's log entry only once it is
stored: committed to the database, or, when the database cannot be reached, appended to a
spool file under the data dir and fsynced. A background thread replays spooled writes, in the
order they were accepted, as soon as the database answers again; a starting server replays
what a stopped or killed one left behind.

Layout (``<data dir>/spool/``)::

    segment-<host>-<pid>-<rand>.jsonl           spooled writes, one JSON record per line
    segment-<host>-<pid>-<rand>.jsonl.applied   replay progress hint (a byte offset)
    rejected.jsonl                              records the database refused for good

A record is ``{"seq", "kind", "accepted_at", "args"}``: ``kind`` names a store function
(:data:`server.api.appliers.APPLIERS`) and ``args`` are its JSON-able keyword arguments. The
direct path and the replay call the same function with the same arguments.

Decisions worth knowing:

* **Order.** While anything is spooled, every new write queues behind it rather than going
  to the database directly, so a later write never overtakes an earlier one (a changed vote
  stays changed). Writes that race each other from different requests have no order.
* **Idempotence.** Every applier can run twice: ``log_completion`` returns the existing
  conversation for a known ``completion_id``; feedback and rankings are upserts of the
  latest value per (message or completion, user). So a write whose commit was cut off
  mid-way and then spooled, or a segment replayed again after a crash, ends in the same
  state (a re-applied vote does get a new ``updated_at``, so the trainer may count it once
  more). The ``.applied`` hint (written after each record, never fsynced) keeps re-applying
  to the record a crash interrupted.
* **Ownership.** A process holds an exclusive ``flock`` on its open segment (taken before
  the file gets its ``segment-`` name). A segment that can be locked belongs to no live
  process; it is adopted, replayed and deleted (at start and then every ``adopt_every``
  seconds), which also covers gateways sharing a data dir.
  A fully replayed segment is deleted; the next outage opens a new one.
* **Torn tails.** A line without its newline was cut off by a crash before its fsync
  returned, so it was never acknowledged; it is dropped on adoption.
* **Refusals.** A record the database rejects as invalid (:class:`~shared.store.NotFound`,
  :class:`~shared.store.Invalid`: e.g. a thumb on a completion that does not exist, which
  could not be checked while the database was away) or that keeps failing with an
  unexpected error goes to ``rejected.jsonl`` with the reason, never silently away.
  While the database is unreachable the record is retried with back-off, forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from server.api.appliers import APPLIERS, PERMANENT_ERRORS, apply_many, is_unavailable
from shared import store
from shared.checkpoints import fsync_path
from shared.schema import utcnow

log = logging.getLogger(__name__)

SEGMENT_GLOB = "segment-*.jsonl"
APPLIED_SUFFIX = ".applied"
REJECTED_FILE = "rejected.jsonl"
_UNAVAILABLE = object()  # a write_many entry not applied: to be spooled


class SpoolError(Exception):
    """A write could be neither committed nor spooled (spool full or not writable)."""


# --------------------------------------------------------------------------- spool


@dataclass
class Written:
    """The outcome of :meth:`WriteSpool.write`: the store function's result when committed,
    or ``queued`` when the write was spooled (its result is not known yet)."""

    result: Any = None
    queued: bool = False


class _Segment:
    """One spool file, held open with an exclusive ``flock`` while this process owns it."""

    def __init__(self, path: Path, fd: int, *, adopted: bool) -> None:
        self.path, self.fd, self.adopted = path, fd, adopted
        self.pending = 0  # records of this segment in the replay queue
        self.appended = 0  # records this process appended to it
        self.size = os.fstat(fd).st_size
        self.closed = False

    @classmethod
    def create(cls, directory: Path) -> _Segment:
        name = f"segment-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        path, creating = directory / name, directory / f".creating-{name}"
        fd = os.open(creating, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            # locked before it gets a name that adopters look for, so none can take it
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(creating, path)
            fsync_path(directory)  # the new name itself must survive a crash
        except OSError:
            os.close(fd)
            creating.unlink(missing_ok=True)
            raise
        return cls(path, fd, adopted=False)

    @classmethod
    def try_adopt(cls, path: Path) -> _Segment | None:
        """Open and lock ``path`` if no live process holds it (else None)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # it may have been replayed and deleted between our listing and our lock
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        return cls(path, fd, adopted=True)

    def append(self, data: bytes) -> int:
        """Append whole lines and fsync; return the end offset. A failed append is undone."""
        start = self.size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                log.exception("could not undo a partial append to %s", self.path)
            raise
        self.size = start + len(data)
        return self.size

    def applied_offset(self) -> int:
        try:
            offset = int((self.path.parent / (self.path.name + APPLIED_SUFFIX)).read_text())
        except (OSError, ValueError):
            return 0
        return offset if 0 <= offset <= self.size else 0

    def mark_applied(self, offset: int) -> None:
        hint = self.path.parent / (self.path.name + APPLIED_SUFFIX)
        tmp = hint.with_name(hint.name + ".tmp")
        try:
            tmp.write_text(str(offset))
            os.replace(tmp, hint)
        except OSError:  # only a hint: without it more records are (harmlessly) replayed
            log.warning("could not record spool progress in %s", hint, exc_info=True)

    def read_records(self, start: int) -> list[tuple[int, dict[str, Any]]]:
        """(end offset, record) of every whole line from ``start`` on."""
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read()
        out, offset = [], start
        for line in data.splitlines(keepends=True):
            offset += len(line)
            if not line.endswith(b"\n"):
                log.warning("%s: dropping a torn last line (never acknowledged)", self.path)
                break
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or record.get("kind") not in APPLIERS:
                    raise ValueError(f"unknown record {line[:80]!r}")
            except ValueError as e:
                log.error("%s: unreadable spool line at %d: %s", self.path, offset, e)
                record = {"kind": "unreadable", "raw": line.decode("utf-8", "replace")}
            out.append((offset, record))
        return out

    def remove(self) -> None:
        """Delete the replayed segment (file first, then its hint) and release it."""
        for path in (self.path, self.path.parent / (self.path.name + APPLIED_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)  # releases the flock


@dataclass
class _Record:
    segment: _Segment
    end: int  # the segment's byte offset just past this record
    record: dict[str, Any]
    attempts: int = 0


@dataclass
class WriteSpool:
    """Commit-or-spool writes (:meth:`write`) and the thread that replays the spool.

    ``on_applied(kind, args, result)`` is called (on the replay thread) after each spooled
    write reached the database; ``max_bytes`` bounds this process's open segment."""

    directory: Path
    engine: Engine
    on_applied: Callable[[str, Mapping[str, Any], Any], None] | None = None
    max_bytes: int = 256 * 1024 * 1024
    retry_max_seconds: float = 2.0
    max_attempts: int = 5  # for unexpected errors; unavailability is retried forever
    adopt_every: float = 30.0
    _queue: deque[_Record] = field(default_factory=deque, init=False, repr=False)
    _segment: _Segment | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self._changed = threading.Condition(self._lock)
        self.replayed = 0  # spooled writes that reached the database
        self.rejected = 0  # spooled writes the database refused (see rejected.jsonl)
        self.unavailable = False  # the last replay found the database unavailable

    # -- writing ----------------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        """Writes accepted into the spool and not yet in the database."""
        return len(self._queue)

    def write(self, kind: str, args: Mapping[str, Any]) -> Written:
        """Commit ``APPLIERS[kind](engine, args)``, or spool it when the database is
        unavailable or earlier writes are still spooled. Returns only once the write is
        committed or durably spooled; store errors (NotFound, Invalid...) of a direct write
        propagate; :class:`SpoolError` when it can be neither committed nor spooled."""
        result = self.write_many(kind, [args])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def write_many(self, kind: str, calls: Sequence[Mapping[str, Any]]) -> list[Any]:
        """:meth:`write` for each of ``calls`` (:func:`apply_many`): one entry per call, a
        :class:`Written` or the exception that call alone raised."""
        results: list[Any] = [_UNAVAILABLE] * len(calls)
        if not self._queue:
            try:
                results = apply_many(self.engine, kind, calls)
            except Exception as e:
                if not is_unavailable(e):
                    raise
                log.warning("database unavailable (%s); spooling %s writes", _reason(e), kind)
        out: list[Any] = []
        for args, result in zip(calls, results, strict=True):
            unreachable = isinstance(result, Exception) and is_unavailable(result)
            if unreachable:
                log.warning("database unavailable (%s); spooling a %s write", _reason(result), kind)
            if not unreachable and result is not _UNAVAILABLE:  # applied, or refused for good
                out.append(result if isinstance(result, Exception) else Written(result))
                continue
            try:
                self._append(kind, args)
                out.append(Written(queued=True))
            except SpoolError as e:
                out.append(e)
        return out

    def _append(self, kind: str, args: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {"kind": kind, "accepted_at": utcnow().isoformat(), "args": args}
        with self._lock:
            try:
                if self._segment is None:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._segment = _Segment.create(self.directory)
                segment = self._segment
                record["seq"] = segment.appended + 1
                data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
                if segment.size + len(data) > self.max_bytes:
                    raise SpoolError(f"the write spool is full ({self.max_bytes} bytes)")
                end = segment.append(data)
            except OSError as e:
                raise SpoolError(f"cannot write the spool in {self.directory}: {e}") from e
            segment.appended += 1
            segment.pending += 1
            self._queue.append(_Record(segment, end, record))
            self._changed.notify_all()

    # -- replaying --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the replay thread is running."""
        return self._thread is not None

    def start(self) -> None:
        """Adopt segments left by stopped processes and start the replay thread."""
        if self._thread is not None:
            return
        self._stop = False
        self.adopt()
        self._thread = threading.Thread(target=self._run, name="palmchat-spool", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Give the replay up to ``timeout`` seconds to empty the spool (none while the
        database is unavailable), then stop it. Whatever is left stays on disk for the next
        start (or another process) to replay."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while (
                self._queue
                and self._thread is not None
                and not self.unavailable
                and time.monotonic() < deadline
            ):
                self._changed.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self._stop = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
            self._thread = None
        with self._lock:
            segments = {r.segment for r in self._queue}
            if self._segment is not None:
                segments.add(self._segment)
            for segment in segments:
                segment.close()
            self._queue.clear()
            self._segment = None
        if segments:
            log.warning("stopped with spooled writes on disk in %s", self.directory)

    def wait_empty(self, timeout: float) -> bool:
        """Block until nothing is spooled (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            return not self._queue

    def adopt(self) -> int:
        """Queue the records of every segment no live process holds; return how many."""
        if not self.directory.is_dir():
            return 0
        paths = sorted(self.directory.glob(SEGMENT_GLOB), key=_mtime)
        count = 0
        with self._lock:
            held = {r.segment.path for r in self._queue}
            if self._segment is not None:
                held.add(self._segment.path)
            for path in paths:
                if path in held:
                    continue
                segment = _Segment.try_adopt(path)
                if segment is None:
                    continue
                records = segment.read_records(segment.applied_offset())
                for end, record in records:
                    segment.pending += 1
                    self._queue.append(_Record(segment, end, record))
                if not records:
                    segment.remove()
                    continue
                count += len(records)
                log.warning("replaying %d spooled writes from %s", len(records), path.name)
            if count:
                self._changed.notify_all()
        return count

    def _run(self) -> None:
        next_adopt = time.monotonic() + self.adopt_every
        retry_at = 0.0
        while True:
            with self._lock:
                while True:
                    if self._stop:
                        return
                    now = time.monotonic()
                    if self._queue and now >= retry_at:
                        head: _Record | None = self._queue[0]
                        break
                    if now >= next_adopt:
                        head = None
                        break
                    wake = min(next_adopt, retry_at) if self._queue else next_adopt
                    self._changed.wait(wake - now)
            if head is None:
                next_adopt = time.monotonic() + self.adopt_every
                try:
                    self.adopt()
                except OSError:
                    log.exception("could not adopt spool segments")
                continue
            retry_at = time.monotonic() + self._replay(head)

    def _replay(self, item: _Record) -> float:
        """Apply the head record; return seconds to wait before trying again (0 = next)."""
        kind, args = item.record["kind"], item.record.get("args") or {}
        try:
            if kind not in APPLIERS:
                raise store.Invalid(f"unreadable spool record: {item.record.get('raw')!r}")
            result = APPLIERS[kind](self.engine, args)
        except Exception as e:
            if is_unavailable(e):
                if not self.unavailable:
                    log.warning("spool replay: database unavailable (%s); retrying", _reason(e))
                self.unavailable = True
                item.attempts = min(item.attempts + 1, 20)
                return min(self.retry_max_seconds, 0.1 * 2**item.attempts)
            self.unavailable = False
            item.attempts += 1
            if not isinstance(e, PERMANENT_ERRORS) and item.attempts < self.max_attempts:
                log.warning("replaying a spooled %s write failed; will retry", kind, exc_info=True)
                return min(self.retry_max_seconds, 0.1 * 2**item.attempts)
            self._reject(item, e)
            self._done(item)
            return 0.0
        if self.unavailable:
            log.warning("spool replay: database back; %d writes to go", len(self._queue) - 1)
        self.unavailable = False
        self.replayed += 1
        self._done(item)
        if self.on_applied is not None:
            try:
                self.on_applied(kind, args, result)
            except Exception:
                log.exception("spool on_applied hook failed")
        return 0.0

    def _reject(self, item: _Record, error: BaseException) -> None:
        self.rejected += 1
        log.error("the database refused a spooled %s write: %s", item.record.get("kind"), error)
        line = {**item.record, "error": f"{type(error).__name__}: {error}"}
        line["rejected_at"] = utcnow().isoformat()
        try:
            with open(self.directory / REJECTED_FILE, "a") as f:
                f.write(json.dumps(line, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            log.exception("could not write %s", self.directory / REJECTED_FILE)

    def _done(self, item: _Record) -> None:
        with self._lock:
            if self._queue and self._queue[0] is item:
                self._queue.popleft()
            segment = item.segment
            segment.pending -= 1
            if not segment.closed:
                if segment.pending == 0:
                    segment.remove()
                    if segment is self._segment:
                        self._segment = None  # the next outage opens a new segment
                else:
                    segment.mark_applied(item.end)
            self._changed.notify_all()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
