"""The writes the API acknowledges, by kind (a completion's log entry, a thumb, a ranking,
labels): the store function that applies each, the grouped form for concurrent completions,
and how an unreachable database is told apart from a bad write. The spool
(:mod:`server.api.spool`) and the direct path call the same functions with the same
arguments."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from shared import store, votes
from shared.db import DatabaseError
from shared.labels import record_labels


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached or used right now (the same
    write may succeed later), as opposed to a bad request or a bug."""
    if isinstance(exc, DatabaseError | sa_exc.TimeoutError):  # connect failed / pool exhausted
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return False


def _completion_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(args)
    kwargs["choices"] = [store.LoggedChoice(**c) for c in kwargs["choices"]]
    return kwargs


def _log_completion(engine: Engine, args: Mapping[str, Any]) -> str:
    return store.log_completion(engine, **_completion_kwargs(args))


APPLIERS: dict[str, Callable[[Engine, Mapping[str, Any]], Any]] = {
    # args of log_completion, with ``choices`` as dicts of LoggedChoice fields
    "completion": _log_completion,
    "feedback": lambda engine, args: votes.record_feedback(engine, **args),
    "ranking": lambda engine, args: votes.record_ranking(engine, **args),
    "labels": lambda engine, args: record_labels(engine, **args),
}
# appliers of many writes of a kind in one transaction, all or none (see apply_many)
BATCH_APPLIERS: dict[str, Callable[[Engine, Sequence[Mapping[str, Any]]], list[Any]]] = {
    "completion": lambda engine, calls: store.log_completions(
        engine, [_completion_kwargs(args) for args in calls]
    ),
}
PERMANENT_ERRORS = (store.NotFound, store.Invalid)


def apply_many(engine: Engine, kind: str, calls: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Apply ``calls`` of ``kind``: one entry per call, its result or the exception it alone
    raised. In one transaction when the kind has a batch applier; when that fails for a
    reason other than unavailability, each call again on its own, so that only a bad call
    fails. Raises when the database is unavailable for the batch."""
    apply = APPLIERS[kind]
    batch = BATCH_APPLIERS.get(kind)
    if batch is not None and len(calls) > 1:
        try:
            return batch(engine, calls)
        except Exception as e:
            if is_unavailable(e):
                raise
    out: list[Any] = []
    for args in calls:
        try:
            out.append(apply(engine, args))
        except Exception as e:
            out.append(e)
    return out
