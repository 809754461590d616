"""Writing a finished (or cut-off) chat completion to the conversation log: what the model
was given, every candidate with its moderation decisions, the sampling parameters set."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING

from server.api import writes
from server.api.deps import AppState
from shared.store import LoggedChoice

if TYPE_CHECKING:
    from server.api.serving import Completion

log = logging.getLogger(__name__)
__all__ = ["log_in_background", "log_to_db", "pending_writes"]


async def log_to_db(state: AppState, c: Completion, *, incomplete: bool = False) -> None:
    """Write the completion to the conversation log, or spool it while the database is away
    (:mod:`server.api.writes`). Errors are logged, never raised to a client, except for a
    continuation of a conversation the log refuses (e.g. someone else's: 404)."""
    choices = [
        asdict(
            LoggedChoice(
                index=i,
                text=cand.text,
                finish_reason=cand.finish_reason,
                completion_tokens=cand.tokens,
                logprobs=[lp.model_dump() for lp in cand.logprobs] if cand.logprobs else None,
                moderation=c.moderation_of(i),
            )
        )
        for i, cand in enumerate(c.candidates)
    ]
    params = c.request.model_dump(
        include={
            "temperature",
            "top_p",
            "top_k",
            "n",
            "seed",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "logprobs",
        }
    )
    # the extras only where a request set them
    params |= c.request.model_dump(
        include={
            "logit_bias",
            "min_tokens",
            "min_p",
            "repetition_penalty",
            "stop_token_ids",
            "ignore_eos",
            "response_format",
            "guided_json",
            "guided_regex",
            "guided_choice",
        },
        exclude_defaults=True,
        by_alias=True,
    )
    params["max_tokens"] = c.params.max_tokens
    # named up front, so a spooled entry can be answered with its conversation's id
    new_conversation_id = None if c.conversation_id else str(uuid.uuid4())
    args = {
        "user_id": c.principal.user_id,
        "completion_id": c.id,
        "messages": c.messages,
        "choices": choices,
        "prompt_tokens": len(c.prompt_ids),
        "policy_version": c.policy_version or None,
        "sampling_params": params,
        "latency_ms": (time.perf_counter() - c.started) * 1000,
        "incomplete": incomplete or not c.done,
        "conversation_id": c.conversation_id,
        "new_conversation_id": new_conversation_id,
        "end_user": c.request.user,
    }
    try:
        written = await writes.write(state, "completion", args)
    except Exception:
        log.exception("could not log completion %s", c.id)
        if c.request.conversation_id:
            raise
        return
    if written.queued:
        c.conversation_id = c.conversation_id or new_conversation_id
    else:
        c.conversation_id = written.result


pending_writes: set[asyncio.Task] = set()


def log_in_background(state: AppState, c: Completion) -> None:
    """Log a cut-off completion from a cancelled handler: the write must outlive it."""
    task = asyncio.get_running_loop().create_task(log_to_db(state, c, incomplete=True))
    pending_writes.add(task)
    task.add_done_callback(pending_writes.discard)
