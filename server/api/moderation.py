"""Moderation in serving: the classifier behind ``POST /v1/moderations`` and the hook that checks
chat input before generation and chat output while it streams.

``moderation_mode`` is ``off``, ``flag`` (decide, log and count; never change an answer) or
``block`` (the default): a flagged request is answered with a short refusal and a flagged reply
ends with ``finish_reason: "content_filter"``. The classifier is the latest version in the
moderation registry (:mod:`shared.moderation`), or an external OpenAI-compatible
``/v1/moderations`` at ``moderation_url``. When it is missing or fails, ``moderation_fail``
decides: ``open`` serves unchecked (counted in ``palmchat_moderation_errors_total``, alerted),
``closed`` refuses as if flagged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from server.engine import Delta, FinishReason
from shared.checkpoints import CheckpointError
from shared.moderation import (
    CATEGORIES,
    MIN_REPLY_WORDS,
    REFUSAL_REPLY,
    Classifier,
    ModerationRegistry,
    Verdict,
)

if TYPE_CHECKING:
    from server.api.metrics import Metrics

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("off", "flag", "block")
FAIL_MODES: tuple[str, ...] = ("open", "closed")
BLOCKED_REPLY = REFUSAL_REPLY
# a streamed reply is checked on its first delta, then whenever it has grown by this many
# characters, and at its end; in block mode text is released only once a check covered it
OUTPUT_CHECK_CHARS = 24
INLINE_CHARS = 8_000  # a batch longer than this is scored off the event loop


class ModerationUnavailable(RuntimeError):
    """No classifier is loaded, or the external moderation server failed."""


class Moderator(Protocol):
    @property
    def version(self) -> str: ...

    async def classify(self, texts: Sequence[str], min_words: int = 0) -> list[Verdict]: ...


class LocalModerator:
    """The latest classifier of the moderation registry; :meth:`refresh` picks up a newer one
    (a damaged version is refused and the loaded one kept)."""

    def __init__(self, registry: ModerationRegistry) -> None:
        self.registry = registry
        self.classifier: Classifier | None = None
        # checks asked for in the same turn of the event loop, scored in one batch: a call
        # costs about as much for 32 texts as for 3 (docs/decisions.md, "Moderation checks
        # are batched")
        self._pending: list[tuple[Classifier, Sequence[str], int, asyncio.Future[Any]]] = []
        self.refresh()

    @property
    def version(self) -> str:
        return self.classifier.version if self.classifier is not None else ""

    def refresh(self) -> None:
        latest = self.registry.latest()
        if latest is None or latest == self.version:
            return
        try:
            self.classifier = self.registry.load(latest)
            log.info("moderation classifier %s loaded", latest)
        except (CheckpointError, OSError, KeyError, RuntimeError) as e:
            log.error("refusing moderation classifier %s: %s; keeping %r", latest, e, self.version)

    async def classify(self, texts: Sequence[str], min_words: int = 0) -> list[Verdict]:
        classifier = self.classifier
        if classifier is None:
            raise ModerationUnavailable(f"no moderation classifier in {self.registry.root}")
        if sum(len(t) for t in texts) > INLINE_CHARS:
            return await asyncio.to_thread(classifier.classify, texts, min_words)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Verdict]] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._score_pending)  # after the callbacks already due this turn
        self._pending.append((classifier, texts, min_words, done))
        return await done

    def _score_pending(self) -> None:
        """Score every check queued this turn: one classifier call per (version, min_words)."""
        pending, self._pending = self._pending, []
        groups: dict[tuple[Classifier, int], list[tuple[Sequence[str], asyncio.Future[Any]]]] = {}
        for classifier, texts, min_words, done in pending:
            groups.setdefault((classifier, min_words), []).append((texts, done))
        for (classifier, min_words), items in groups.items():
            try:
                verdicts = classifier.classify([t for texts, _ in items for t in texts], min_words)
            except Exception as exc:  # every caller of the batch gets the error
                for _, done in items:
                    if not done.done():
                        done.set_exception(exc)
                continue
            start = 0
            for texts, done in items:
                if not done.done():  # a cancelled caller is skipped
                    done.set_result(verdicts[start : start + len(texts)])
                start += len(texts)


class RemoteModerator:
    """An external OpenAI-compatible moderation server (``POST {url}/moderations``)."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers)
        self._version = ""

    @property
    def version(self) -> str:
        return self._version

    async def classify(self, texts: Sequence[str], min_words: int = 0) -> list[Verdict]:
        try:  # the external server applies its own rules: min_words is palmchat's
            r = await self.client.post(f"{self.url}/moderations", json={"input": list(texts)})
            r.raise_for_status()
            body = r.json()
            self._version = str(body.get("model", "external"))
            return [
                Verdict(
                    bool(item["flagged"]),
                    {c: bool(item["categories"].get(c, False)) for c in CATEGORIES},
                    {c: float(item["category_scores"].get(c, 0.0)) for c in CATEGORIES},
                )
                for item in body["results"]
            ]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModerationUnavailable(f"moderation server {self.url}: {e}") from e

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass(frozen=True)
class Decision:
    """One moderation check of a chat's input or of one reply: what was found and done."""

    stage: str  # input | output
    mode: str
    action: str  # allow | flag | block
    flagged: bool
    categories: list[str]
    scores: dict[str, float]
    classifier: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "scores"}
        # the scores that matter to a reader: every category over 1%
        out["scores"] = {c: s for c, s in self.scores.items() if s >= 0.01}
        return out


@dataclass
class ModerationHook:
    moderator: Moderator | None
    mode: str = "block"
    fail: str = "open"
    metrics: Metrics | None = None

    @property
    def active(self) -> bool:
        return self.mode != "off"

    async def classify(self, texts: Sequence[str], stage: str = "api") -> list[Verdict]:
        min_words = MIN_REPLY_WORDS if stage == "output" else 0
        """Verdicts for ``texts`` (the moderation endpoint); ModerationUnavailable when none
        can be given."""
        if self.moderator is None:
            raise ModerationUnavailable("moderation is not configured")
        started = time.perf_counter()
        try:
            verdicts = await self.moderator.classify(texts, min_words)
        except ModerationUnavailable:
            if self.metrics is not None:
                self.metrics.moderation_errors.labels(stage).inc()
                self.metrics.moderation_up.set(0)
            raise
        if self.metrics is not None:
            self.metrics.moderation_seconds.observe(time.perf_counter() - started)
            self.metrics.moderation_up.set(1)
        return verdicts

    def refresh(self) -> None:
        """Load a newer local classifier if one was published (a thread: it reads files)."""
        if isinstance(self.moderator, LocalModerator):
            self.moderator.refresh()
        if self.metrics is not None and isinstance(self.moderator, LocalModerator):
            self.metrics.moderation_up.set(1 if self.moderator.classifier is not None else 0)

    async def check(self, stage: str, text: str) -> Decision:
        """Decide on one chat text (``stage`` input or output) under the configured mode."""
        classifier = self.moderator.version if self.moderator is not None else ""
        try:
            (verdict,) = await self.classify([text], stage)
        except ModerationUnavailable as e:
            action = "block" if self.fail == "closed" and self.mode == "block" else "allow"
            decision = Decision(stage, self.mode, action, False, [], {}, classifier, str(e))
        else:
            flagged = verdict.flagged
            action = ("block" if self.mode == "block" else "flag") if flagged else "allow"
            decision = Decision(
                stage,
                self.mode,
                action,
                flagged,
                verdict.flagged_categories,
                verdict.category_scores,
                self.moderator.version if self.moderator is not None else classifier,
            )
        self.count(decision)
        return decision

    def count(self, d: Decision) -> None:
        if self.metrics is None:
            return
        for category in d.categories or ["none"]:
            self.metrics.moderation.labels(d.stage, category, d.action).inc()


@dataclass
class Screen:
    """The output checks of one chat request's candidates."""

    hook: ModerationHook
    n: int
    released: list[str] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)
    held: list[list[Delta]] = field(default_factory=list)
    held_text: list[str] = field(default_factory=list)  # the held deltas' text
    decisions: list[Decision | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.released = [""] * self.n
        self.checked = [-1] * self.n  # length of the text the last check covered
        self.held = [[] for _ in range(self.n)]
        self.held_text = [""] * self.n
        self.decisions = [None] * self.n

    @property
    def filtered(self) -> bool:
        return any(d is not None and d.action == "block" for d in self.decisions)

    async def run(self, deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
        """``deltas`` as the client may see them: in block mode a candidate's text is held
        until a check covers it, and a flagged one ends with ``content_filter``."""
        stopped = [False] * self.n
        block = self.hook.mode == "block"
        async for delta in deltas:
            i = delta.index
            if stopped[i]:
                continue
            self.held[i].append(delta)
            self.held_text[i] += delta.text
            text = self.released[i] + self.held_text[i]
            due = (
                delta.finish_reason is not None
                or self.checked[i] < 0
                or len(text) - self.checked[i] >= OUTPUT_CHECK_CHARS
            )
            if not due and block:
                continue  # held until the next check
            if due:
                decision = await self.hook.check("output", text)
                self.checked[i] = len(text)
                self.decisions[i] = _worst(self.decisions[i], decision)
                if decision.action == "block":
                    stopped[i] = True
                    last = self.held[i][-1]
                    self.held[i].clear()
                    yield replace(
                        last,
                        text="",
                        token_ids=[],
                        logprobs=None,
                        finish_reason=FinishReason.CONTENT_FILTER,
                    )
                    if all(stopped):
                        return  # the caller cancels the engine request
                    continue
            self.released[i] = text
            self.held_text[i] = ""
            held, self.held[i] = self.held[i], []
            for d in held:
                yield d


def _worst(old: Decision | None, new: Decision) -> Decision:
    """The decision a reply is logged with: its first flagged check, else its last check."""
    if old is not None and old.flagged:
        return old
    return new


def refusal_deltas(request_id: str, n: int, version: str) -> list[Delta]:
    """What a blocked request streams: the refusal for each of its ``n`` candidates."""
    return [
        Delta(request_id, i, [], BLOCKED_REPLY, None, FinishReason.CONTENT_FILTER, version)
        for i in range(n)
    ]
