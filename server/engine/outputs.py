"""What the engine hands back: per-step deltas, per-request metrics, and the text side of a
sequence (incremental detokenization and stop strings matched across token boundaries)."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Self

from server.engine.sequence import FinishReason, Sequence, TokenLogprob
from shared.tokenizer import StreamDecoder, Tokenizer


@dataclass(slots=True)
class RequestMetrics:
    """Timings of one finished candidate, in seconds."""

    queue_time: float
    time_to_first_token: float | None
    inter_token_latencies: list[float]
    prompt_tokens: int
    cached_prompt_tokens: int
    output_tokens: int
    preemptions: int


@dataclass(slots=True)
class Delta:
    """New output of candidate ``index`` of a request since its previous delta.

    ``text`` may lag ``token_ids`` while it could still be the start of a stop string or of a
    multi-byte character; the final delta (``finish_reason`` set) carries whatever is left.
    """

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    policy_version: str
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class AsyncClosing(ABC):
    """``async with`` closes it: leaving the block awaits :meth:`aclose`."""

    @abstractmethod
    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class DeltaStream(AsyncClosing):
    """One request's deltas as an async iterator (all candidates, in step order), ending once
    every candidate has finished. Closing it, leaving its ``async with`` or dropping it
    cancels what is still running, as :meth:`cancel` does."""

    @abstractmethod
    def cancel(self) -> None: ...

    @abstractmethod
    async def __anext__(self) -> Delta: ...

    def __aiter__(self) -> Self:
        return self

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
            self.cancel()


@dataclass
class TextState:
    """Detokenizes one sequence incrementally and watches for its stop strings."""

    tokenizer: Tokenizer
    stop: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    decoder: StreamDecoder = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = StreamDecoder(self.tokenizer)
        self._longest = max((len(s) for s in self.stop), default=0)

    def push(self, token_id: int) -> bool:
        """Add a token's text; True if a stop string now appears (text is cut before it)."""
        piece = self.decoder.push(token_id)
        if not piece:
            return False
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        if not self.stop:
            return False
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def finish(self, stopped_by_string: bool) -> None:
        if not stopped_by_string:
            self.text += self.decoder.flush()

    def take(self, final: bool) -> str:
        """Text not handed out yet, holding back a tail that may begin a stop string."""
        end = len(self.text)
        if not final:
            end -= self._held_back()
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


def metrics_of(seq: Sequence) -> RequestMetrics:
    return RequestMetrics(
        queue_time=seq.queue_time or 0.0,
        time_to_first_token=seq.time_to_first_token,
        inter_token_latencies=list(seq.inter_token),
        prompt_tokens=seq.num_prompt_tokens,
        cached_prompt_tokens=seq.first_cached_tokens,
        output_tokens=len(seq.output_ids),
        preemptions=seq.num_preemptions,
    )
