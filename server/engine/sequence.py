"""A sequence: one candidate continuation of one prompt, and its life in the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from server.engine.guided import Guide
from server.engine.sampling import SamplingParams

_uids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    CANCELLED = "cancelled"
    # set by the gateway's moderation (server/api/moderation.py), never by the engine
    CONTENT_FILTER = "content_filter"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Sequence:
    """Candidate ``index`` of request ``request_id``: prompt ids, generated ids, KV blocks."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    policy_version: str
    arrival: float = field(default_factory=time.perf_counter)
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at allocation
    first_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None
    guide: Guide | None = None  # its grammar state, when its params are guided
    # timings (perf_counter seconds)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    inter_token: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.uid = next(_uids)  # unique for the process: identifies it in a decode batch
        if not self.prompt_ids:
            raise ValueError("a prompt needs at least one token")
        self.token_ids = list(self.prompt_ids)
        if self.params.seed is not None and self.params.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.params.seed + self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int, now: float) -> None:
        self.token_ids.append(token_id)
        self.output_ids.append(token_id)
        if self.first_token is None:
            self.first_token = now
        else:
            self.inter_token.append(now - (self.last_token or now))
        self.last_token = now

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival
