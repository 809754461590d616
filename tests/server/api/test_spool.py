"""The durable write spool: commit-or-spool, ordered and idempotent replay, adoption of a
stopped process's segments, torn tails and refused records.

The database that is "down" is a PostgreSQL URL on a port nobody listens on (connection
refused, as during an outage); the one that is up is a SQLite file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from server.api.appliers import is_unavailable
from server.api.spool import APPLIED_SUFFIX, REJECTED_FILE, WriteSpool
from shared.db import init_db, make_engine, session
from shared.schema import Feedback, Message, Ranking, User
from shared.store import LoggedChoice, NotFound, log_completion

DOWN_URL = "postgresql://postgres@127.0.0.1:1/palmchat"


@pytest.fixture
def db(tmp_path: Path) -> Engine:
    engine = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with session(engine) as s:
        s.add(User(name="ada"))
    log_completion(
        engine,
        user_id=1,
        completion_id="chatcmpl-a",
        messages=[{"role": "user", "content": "2 + 2?"}],
        choices=[LoggedChoice(0, "4", "stop", 1), LoggedChoice(1, "four", "stop", 1)],
        prompt_tokens=3,
        policy_version="v1",
        sampling_params={},
        latency_ms=1.0,
    )
    return engine


def _vote(rating: int, completion_id: str = "chatcmpl-a", index: int = 0) -> dict:
    return {"user_id": 1, "completion_id": completion_id, "choice_index": index, "rating": rating}


def _completion(cid: str, conv: str) -> dict:
    return {
        "user_id": 1,
        "completion_id": cid,
        "messages": [{"role": "user", "content": "3 + 3?"}],
        "choices": [{"index": 0, "text": "6", "finish_reason": "stop", "completion_tokens": 1}],
        "prompt_tokens": 3,
        "policy_version": "v1",
        "sampling_params": {"temperature": 1.0},
        "latency_ms": 2.0,
        "new_conversation_id": conv,
    }


def _votes(engine: Engine) -> dict[int, int]:
    with session(engine) as s:
        return {f.message_id: f.rating for f in s.exec(select(Feedback))}


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.jsonl"))


def _replay_all(spool: WriteSpool) -> None:
    """Run the spool's replayer until its backlog is empty, then stop it."""
    spool.start()
    try:
        assert spool.wait_empty(10)
    finally:
        spool.stop()


def test_writes_go_straight_to_a_healthy_database(tmp_path: Path, db: Engine) -> None:
    spool = WriteSpool(tmp_path / "spool", db)
    written = spool.write("feedback", _vote(1))
    assert not written.queued and written.result["rating"] == 1
    with pytest.raises(NotFound):  # a bad request is an error, not something to spool
        spool.write("feedback", _vote(1, completion_id="chatcmpl-nope"))
    assert spool.backlog == 0 and not (tmp_path / "spool").exists()


def test_spooled_writes_replay_in_order_in_the_next_process(tmp_path: Path, db: Engine) -> None:
    down = make_engine(DOWN_URL)
    first = WriteSpool(tmp_path / "spool", down)
    first.start()
    args = [
        ("feedback", _vote(1)),
        ("completion", _completion("chatcmpl-b", "c0ffee00-0000-4000-8000-000000000001")),
        ("feedback", _vote(-1, completion_id="chatcmpl-b")),
        ("ranking", {"user_id": 1, "completion_id": "chatcmpl-a", "ranking": [1, 0]}),
        ("feedback", _vote(-1)),  # the vote changed: the last one must win
    ]
    for kind, a in args:
        assert first.write(kind, a).queued
    (segment,) = _segments(tmp_path / "spool")
    lines = [json.loads(line) for line in segment.read_text().splitlines()]
    assert [(r["seq"], r["kind"]) for r in lines] == [(i + 1, k) for i, (k, _) in enumerate(args)]
    assert first.backlog == 5
    first.stop(timeout=0.5)  # the database is down: the writes stay on disk
    assert _segments(tmp_path / "spool") == [segment]
    assert _votes(db) == {}

    second = WriteSpool(tmp_path / "spool", db)
    _replay_all(second)
    assert (second.replayed, second.rejected) == (5, 0)
    with session(db) as s:
        a0 = s.exec(select(Message).where(Message.completion_id == "chatcmpl-a")).first()
        b0 = s.exec(select(Message).where(Message.completion_id == "chatcmpl-b")).one()
        ranking = s.exec(select(Ranking)).one()
    assert b0.conversation_id == "c0ffee00-0000-4000-8000-000000000001"
    assert _votes(db) == {a0.id: -1, b0.id: -1}
    assert ranking.ranking == [a0.id + 1, a0.id]
    assert _segments(tmp_path / "spool") == []


def test_a_segment_held_by_a_live_process_is_left_alone(tmp_path: Path, db: Engine) -> None:
    down = WriteSpool(tmp_path / "spool", make_engine(DOWN_URL))
    assert down.write("feedback", _vote(1)).queued
    other = WriteSpool(tmp_path / "spool", db)
    assert other.adopt() == 0  # locked by `down`, which is alive
    down.stop(timeout=0)
    assert other.adopt() == 1


def test_replay_survives_torn_tails_garbage_and_refusals(tmp_path: Path, db: Engine) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    records = [
        {"seq": 1, "kind": "feedback", "args": _vote(1)},
        {"seq": 2, "kind": "feedback", "args": _vote(1, completion_id="chatcmpl-gone")},
    ]
    body = "".join(json.dumps(r) + "\n" for r in records) + "not json\n"
    body += json.dumps({"seq": 4, "kind": "feedback", "args": _vote(-1)})[:30]  # torn: no \n
    (directory / "segment-dead-1-00000000.jsonl").write_text(body)
    spool = WriteSpool(directory, db)
    assert spool.adopt() == 3  # the torn tail was never acknowledged
    _replay_all(spool)
    assert (spool.replayed, spool.rejected) == (1, 2)
    assert list(_votes(db).values()) == [1]
    rejected = [json.loads(x) for x in (directory / REJECTED_FILE).read_text().splitlines()]
    assert [r.get("seq") for r in rejected] == [2, None]
    assert "NotFound" in rejected[0]["error"] and "unreadable" in rejected[1]["error"]
    assert _segments(directory) == []


def test_the_progress_hint_skips_what_was_applied(tmp_path: Path, db: Engine) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    lines = [json.dumps({"seq": i, "kind": "feedback", "args": _vote(r)}) + "\n"
             for i, r in ((1, 1), (2, -1))]  # fmt: skip
    segment = directory / "segment-dead-2-00000000.jsonl"
    segment.write_text("".join(lines))
    hint = directory / (segment.name + APPLIED_SUFFIX)
    hint.write_text(str(len(lines[0])))
    first = WriteSpool(directory, db)
    assert first.adopt() == 1
    assert WriteSpool(directory, db).adopt() == 0  # `first` holds it now
    first.stop(timeout=0)  # not started: nothing replayed, the segment stays
    hint.write_text("garbage")  # a hint that cannot be read means: from the start
    assert WriteSpool(directory, db).adopt() == 2


def test_unavailability_is_told_apart_from_bad_requests(db: Engine) -> None:
    with pytest.raises(Exception) as down:
        make_engine(DOWN_URL).connect()
    assert is_unavailable(down.value)
    assert not is_unavailable(NotFound("x")) and not is_unavailable(ValueError("x"))


def _conversation_messages(engine: Engine, conv: str) -> list[tuple[str, str]]:
    with session(engine) as s:
        rows = s.exec(select(Message).where(Message.conversation_id == conv).order_by(Message.id))
        return [(m.role, m.content) for m in rows]


def test_a_group_of_completions_is_written_together_and_a_bad_one_fails_alone(
    tmp_path: Path, db: Engine
) -> None:
    spool = WriteSpool(tmp_path / "spool", db)
    convs = [f"c0ffee00-0000-4000-8000-00000000001{i}" for i in range(3)]
    calls = [_completion(f"chatcmpl-g{i}", conv) for i, conv in enumerate(convs)]
    # someone else's conversation (user 2 does not even exist): refused, the others stored
    stranger = _completion("chatcmpl-x", convs[0]) | {"user_id": 2, "conversation_id": convs[0]}
    results = spool.write_many("completion", [calls[0], stranger, *calls[1:]])
    assert isinstance(results[1], NotFound)
    assert [r.result for i, r in enumerate(results) if i != 1] == convs
    for conv in convs:
        assert _conversation_messages(db, conv) == [("user", "3 + 3?"), ("assistant", "6")]
    # written again (a retried request): the same conversations, nothing doubled
    again = spool.write_many("completion", calls)
    assert [r.result for r in again] == convs
    assert _conversation_messages(db, convs[0]) == [("user", "3 + 3?"), ("assistant", "6")]


def test_a_group_is_spooled_whole_while_the_database_is_down(tmp_path: Path, db: Engine) -> None:
    down = WriteSpool(tmp_path / "spool", make_engine(DOWN_URL))
    down.start()
    convs = [f"c0ffee00-0000-4000-8000-00000000002{i}" for i in range(4)]
    calls = [_completion(f"chatcmpl-d{i}", conv) for i, conv in enumerate(convs)]
    assert all(r.queued for r in down.write_many("completion", calls))
    assert down.backlog == 4
    down.stop(timeout=0.5)  # still down: the writes stay on disk for the next process
    _replay_all(WriteSpool(tmp_path / "spool", db))
    for conv in convs:
        assert _conversation_messages(db, conv) == [("user", "3 + 3?"), ("assistant", "6")]
