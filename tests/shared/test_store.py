"""Conversation log and feedback store: threads, ownership, votes, rankings, TRL exports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from shared.db import init_db, session
from shared.feedback_reader import export_kto, export_messages, export_preference
from shared.schema import Feedback, Message, Ranking, User
from shared.store import (
    Invalid,
    LoggedChoice,
    NotFound,
    continuation_prompt,
    delete_conversation,
    get_conversation,
    list_conversations,
    log_completion,
)
from shared.votes import feedback_summary, record_feedback, record_ranking

SYSTEM = {"role": "system", "content": "Be brief."}
HELLO = {"role": "user", "content": "Hello there"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        return init_db(f"sqlite:///{tmp_path / 's.db'}")
    return init_db(request.getfixturevalue("postgres_url"))


def _user(engine: Engine, name: str) -> int:
    with session(engine) as s:
        user = User(name=name)
        s.add(user)
        s.flush()
        return user.id


@pytest.fixture
def alice(engine: Engine) -> int:
    return _user(engine, "alice")


@pytest.fixture
def bob(engine: Engine) -> int:
    return _user(engine, "bob")


def _log(
    engine: Engine,
    user_id: int,
    cid: str,
    texts: list[str],
    messages: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> str:
    choices = [LoggedChoice(i, t, "stop", len(t.split())) for i, t in enumerate(texts)]
    return log_completion(
        engine,
        user_id=user_id,
        completion_id=cid,
        messages=messages if messages is not None else [SYSTEM, HELLO],
        choices=choices,
        prompt_tokens=7,
        policy_version=kw.pop("policy_version", "v1"),
        sampling_params={"temperature": 0.7},
        latency_ms=12.5,
        **kw,
    )


PROMPT = [SYSTEM, HELLO]


def test_log_then_get_returns_the_whole_thread_with_metadata(engine: Engine, alice: int) -> None:
    conv_id = _log(engine, alice, "c1", ["Hi!"])
    conv = get_conversation(engine, alice, conv_id)
    assert conv["id"] == conv_id and conv["title"] == "Hello there"
    system, user, reply = conv["messages"]
    assert (system["role"], system["parent_id"]) == ("system", None)
    assert (user["role"], user["content"], user["parent_id"]) == (
        "user",
        "Hello there",
        system["id"],
    )
    assert reply["parent_id"] == user["id"] and reply["content"] == "Hi!"
    assert reply["completion_id"] == "c1" and reply["choice_index"] == 0
    assert reply["policy_version"] == "v1" and reply["finish_reason"] == "stop"
    assert reply["incomplete"] is False and reply["rating"] is None
    with session(engine) as s:
        row = s.get(Message, reply["id"])
    assert row.sampling_params == {"temperature": 0.7} and row.prompt_tokens == 7
    assert row.completion_tokens == 1 and row.latency_ms == 12.5
    listed = list_conversations(engine, alice)
    assert [c["id"] for c in listed] == [conv_id] and listed[0]["title"] == "Hello there"


def test_long_first_user_message_gives_a_title_of_at_most_60_chars(
    engine: Engine, alice: int
) -> None:
    conv_id = _log(engine, alice, "c1", ["ok"], messages=[{"role": "user", "content": "x " * 100}])
    assert len(get_conversation(engine, alice, conv_id)["title"]) <= 60


def test_messages_are_stored_as_the_chat_template_reads_them(engine: Engine, alice: int) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    conv_id = _log(engine, alice, "c1", ["Hi!"], messages=messages)
    stored = get_conversation(engine, alice, conv_id)["messages"]
    assert [(m["role"], m["content"]) for m in stored[:2]] == [
        ("system", "Be brief."),
        ("user", "Hello there"),
    ]
    picture = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    for bad in ({"role": "tool", "content": "x"}, {"role": "user", "content": picture}):
        with pytest.raises(Invalid):
            _log(engine, alice, "c2", ["Hi!"], messages=[bad])


def test_n_choices_are_siblings_with_indices_0_to_2(engine: Engine, alice: int) -> None:
    conv_id = _log(engine, alice, "c1", ["a", "b", "c"])
    messages = get_conversation(engine, alice, conv_id)["messages"]
    replies = [m for m in messages if m["role"] == "assistant"]
    assert [m["choice_index"] for m in replies] == [0, 1, 2]
    assert {m["parent_id"] for m in replies} == {messages[1]["id"]}


def test_continuing_threads_the_new_turn_under_the_previous_answer(
    engine: Engine, alice: int
) -> None:
    conv_id = _log(engine, alice, "c1", ["Hi!"])
    follow_up = {"role": "user", "content": "How are you?"}
    history = [*PROMPT, {"role": "assistant", "content": "Hi!"}, follow_up]
    assert (
        _log(engine, alice, "c2", ["Fine."], messages=history, conversation_id=conv_id) == conv_id
    )
    messages = get_conversation(engine, alice, conv_id)["messages"]
    assert [m["content"] for m in messages] == [
        "Be brief.",
        "Hello there",
        "Hi!",
        "How are you?",
        "Fine.",
    ]
    assert [m["parent_id"] for m in messages[1:]] == [m["id"] for m in messages[:-1]]


def test_continuing_after_n_choices_follows_the_reply_the_client_sent_back(
    engine: Engine, alice: int
) -> None:
    conv_id = _log(engine, alice, "c1", ["a", "b", "c"])
    history = [*PROMPT, {"role": "assistant", "content": "b"}, {"role": "user", "content": "more"}]
    _log(engine, alice, "c2", ["d"], messages=history, conversation_id=conv_id)
    by_content = {m["content"]: m for m in get_conversation(engine, alice, conv_id)["messages"]}
    assert by_content["more"]["parent_id"] == by_content["b"]["id"]
    assert by_content["d"]["parent_id"] == by_content["more"]["id"]


def _path(engine: Engine, user_id: int, conv_id: str, content: str) -> list[str]:
    """The stored path from a root to the message with ``content``, as texts."""
    by_id = {m["id"]: m for m in get_conversation(engine, user_id, conv_id)["messages"]}
    node = next(m for m in by_id.values() if m["content"] == content)
    path = [node["content"]]
    while node["parent_id"] is not None:
        node = by_id[node["parent_id"]]
        path.append(node["content"])
    return path[::-1]


def test_a_history_that_leaves_the_log_is_stored_as_a_new_branch(
    engine: Engine, alice: int
) -> None:
    """The client edited the answer it sends back: the reply was generated from the edited
    history, so that is the path it is stored under, not the answer the log holds."""
    conv_id = _log(engine, alice, "c1", ["a", "b", "c"])
    record_ranking(engine, user_id=alice, completion_id="c1", ranking=[2, 0, 1])
    history = [
        *PROMPT,
        {"role": "assistant", "content": "edited"},
        {"role": "user", "content": "q"},
    ]
    _log(engine, alice, "c2", ["d"], messages=history, conversation_id=conv_id)
    assert _path(engine, alice, conv_id, "d") == ["Be brief.", "Hello there", "edited", "q", "d"]
    by_content = {m["content"]: m for m in get_conversation(engine, alice, conv_id)["messages"]}
    assert by_content["edited"]["parent_id"] == by_content["a"]["parent_id"]
    assert by_content["edited"]["completion_id"] is None  # the client's text, not a reply
    # a history that differs from the first message on starts a branch at the root
    other = [{"role": "user", "content": "Something else"}]
    _log(engine, alice, "c3", ["e"], messages=other, conversation_id=conv_id)
    assert _path(engine, alice, conv_id, "e") == ["Something else", "e"]


def test_the_same_prompt_again_is_a_regeneration_beside_the_first_answer(
    engine: Engine, alice: int
) -> None:
    conv_id = _log(engine, alice, "c1", ["a"])
    assert _log(engine, alice, "c2", ["a2"], conversation_id=conv_id) == conv_id
    by_content = {m["content"]: m for m in get_conversation(engine, alice, conv_id)["messages"]}
    assert by_content["a2"]["parent_id"] == by_content["a"]["parent_id"]
    assert len(get_conversation(engine, alice, conv_id)["messages"]) == 4


def test_only_new_messages_continue_from_the_ranked_best_or_the_newest_answer(
    engine: Engine, alice: int, bob: int
) -> None:
    conv_id = _log(engine, alice, "c1", ["a", "b", "c"])
    more = [{"role": "user", "content": "more"}]
    newest = continuation_prompt(engine, alice, conv_id, more)
    assert [m["content"] for m in newest] == ["Be brief.", "Hello there", "c", "more"]
    record_ranking(engine, user_id=alice, completion_id="c1", ranking=[1, 0, 2])
    ranked = continuation_prompt(engine, alice, conv_id, more)
    assert ranked == [*PROMPT, {"role": "assistant", "content": "b"}, *more]
    # logged with that prompt, the reply hangs under the ranked best
    _log(engine, alice, "c2", ["d"], messages=ranked, conversation_id=conv_id)
    assert _path(engine, alice, conv_id, "d") == ["Be brief.", "Hello there", "b", "more", "d"]
    # and the next continuation goes on from there
    again = continuation_prompt(engine, alice, conv_id, [{"role": "user", "content": "next"}])
    assert [m["content"] for m in again][-3:] == ["more", "d", "next"]
    # a full history is generated from as sent
    full = [*PROMPT, {"role": "assistant", "content": "zz"}, *more]
    assert continuation_prompt(engine, alice, conv_id, full) == full
    with pytest.raises(NotFound):
        continuation_prompt(engine, bob, conv_id, more)


def _assert_not_found(engine: Engine, user_id: int, conv_id: str, completion_id: str) -> None:
    """To this user the conversation is not there: reading, deleting and rating it all fail."""
    with pytest.raises(NotFound):
        get_conversation(engine, user_id, conv_id)
    with pytest.raises(NotFound):
        delete_conversation(engine, user_id, conv_id)
    with pytest.raises(NotFound):
        record_feedback(
            engine, user_id=user_id, completion_id=completion_id, choice_index=0, rating=1
        )


def test_other_user_gets_not_found_everywhere(engine: Engine, alice: int, bob: int) -> None:
    conv_id = _log(engine, alice, "c1", ["a", "b"])
    _assert_not_found(engine, bob, conv_id, "c1")
    with pytest.raises(NotFound):
        record_ranking(engine, user_id=bob, completion_id="c1", ranking=[0, 1])
    with pytest.raises(NotFound):
        _log(engine, bob, "c2", ["x"], conversation_id=conv_id)
    with pytest.raises(NotFound):
        get_conversation(engine, alice, "no-such-conversation")
    assert list_conversations(engine, bob) == []
    assert len(get_conversation(engine, alice, conv_id)["messages"]) == 4


def test_logging_the_same_completion_twice_is_idempotent(engine: Engine, alice: int) -> None:
    conv_id = _log(engine, alice, "c1", ["a", "b"])
    assert _log(engine, alice, "c1", ["a", "b"]) == conv_id
    with session(engine) as s:
        assert len(s.exec(select(Message)).all()) == 4
    assert len(list_conversations(engine, alice)) == 1


def test_second_vote_replaces_the_first(engine: Engine, alice: int) -> None:
    conv_id = _log(engine, alice, "c1", ["a"])
    first = record_feedback(engine, user_id=alice, completion_id="c1", choice_index=0, rating=1)
    second = record_feedback(
        engine, user_id=alice, completion_id="c1", choice_index=0, rating=-1, reason=" wrong "
    )
    assert second["id"] == first["id"] and second["rating"] == -1 and second["reason"] == "wrong"
    assert second["updated_at"] >= first["updated_at"]
    with session(engine) as s:
        rows = s.exec(select(Feedback)).all()
    assert [(r.rating, r.reason) for r in rows] == [(-1, "wrong")]
    assert get_conversation(engine, alice, conv_id)["messages"][-1]["rating"] == -1


@pytest.mark.parametrize("rating", [0, 2, -2, True])
def test_rating_other_than_plus_or_minus_one_is_invalid(
    engine: Engine, alice: int, rating: Any
) -> None:
    _log(engine, alice, "c1", ["a"])
    with pytest.raises(Invalid):
        record_feedback(engine, user_id=alice, completion_id="c1", choice_index=0, rating=rating)


def test_feedback_on_a_missing_choice_is_not_found(engine: Engine, alice: int) -> None:
    _log(engine, alice, "c1", ["a"])
    with pytest.raises(NotFound):
        record_feedback(engine, user_id=alice, completion_id="c1", choice_index=5, rating=1)


def test_ranking_is_stored_as_message_ids_and_replaced_on_rerank(
    engine: Engine, alice: int
) -> None:
    conv_id = _log(engine, alice, "c1", ["a", "b", "c"])
    ids = [m["id"] for m in get_conversation(engine, alice, conv_id)["messages"][2:]]
    result = record_ranking(engine, user_id=alice, completion_id="c1", ranking=[2, 0, 1])
    assert result["message_ids"] == [ids[2], ids[0], ids[1]] and result["ranking"] == [2, 0, 1]
    record_ranking(engine, user_id=alice, completion_id="c1", ranking=[0, 2])
    with session(engine) as s:
        rows = s.exec(select(Ranking)).all()
    assert [(r.completion_id, r.user_id, r.ranking) for r in rows] == [
        ("c1", alice, [ids[0], ids[2]])
    ]


@pytest.mark.parametrize("ranking", [[], [0], [0, 0, 1], [0, 1, 3], [0, -1], ["0", "1"], [True, 0]])
def test_invalid_rankings_are_rejected(engine: Engine, alice: int, ranking: list[Any]) -> None:
    _log(engine, alice, "c1", ["a", "b", "c"])
    with pytest.raises(Invalid):
        record_ranking(engine, user_id=alice, completion_id="c1", ranking=ranking)


def test_deleted_conversation_disappears_from_list_and_get(engine: Engine, alice: int) -> None:
    keep = _log(engine, alice, "c1", ["a"])
    gone = _log(engine, alice, "c2", ["b"])
    delete_conversation(engine, alice, gone)
    assert [c["id"] for c in list_conversations(engine, alice)] == [keep]
    _assert_not_found(engine, alice, gone, "c2")


def test_list_is_newest_first_and_pages_with_before(engine: Engine, alice: int) -> None:
    ids = [_log(engine, alice, f"c{i}", ["a"]) for i in range(3)]
    listed = list_conversations(engine, alice)
    assert [c["id"] for c in listed] == ids[::-1]
    page = list_conversations(engine, alice, limit=1, before=listed[0]["updated_at"])
    assert [c["id"] for c in page] == [ids[1]]


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_ranking_of_three_choices_exports_three_preference_pairs(
    engine: Engine, alice: int
) -> None:
    _log(engine, alice, "c1", ["a", "b", "c"])
    record_ranking(engine, user_id=alice, completion_id="c1", ranking=[1, 2, 0])
    assert list(export_preference(engine)) == [
        {"prompt": PROMPT, "chosen": _reply("b"), "rejected": _reply("c")},
        {"prompt": PROMPT, "chosen": _reply("b"), "rejected": _reply("a")},
        {"prompt": PROMPT, "chosen": _reply("c"), "rejected": _reply("a")},
    ]


def test_thumbs_up_and_down_export_one_pair_and_kto_and_sft_rows(
    engine: Engine, alice: int
) -> None:
    _log(engine, alice, "c1", ["good", "bad", "unrated"])
    record_feedback(engine, user_id=alice, completion_id="c1", choice_index=0, rating=1)
    record_feedback(engine, user_id=alice, completion_id="c1", choice_index=1, rating=-1)
    assert list(export_preference(engine)) == [
        {"prompt": PROMPT, "chosen": _reply("good"), "rejected": _reply("bad")}
    ]
    assert list(export_kto(engine)) == [
        {"prompt": PROMPT, "completion": _reply("good"), "label": True},
        {"prompt": PROMPT, "completion": _reply("bad"), "label": False},
    ]
    assert list(export_messages(engine)) == [{"messages": [*PROMPT, *_reply("good")]}]


def test_votes_on_regenerations_of_the_same_prompt_pair_up(engine: Engine, alice: int) -> None:
    conv_id = _log(engine, alice, "c1", ["first"])
    history = [*PROMPT, {"role": "assistant", "content": "first"}, {"role": "user", "content": "q"}]
    _log(engine, alice, "c2", ["x"], messages=history, conversation_id=conv_id)
    _log(engine, alice, "c3", ["y"], messages=history, conversation_id=conv_id)
    record_feedback(engine, user_id=alice, completion_id="c2", choice_index=0, rating=-1)
    record_feedback(engine, user_id=alice, completion_id="c3", choice_index=0, rating=1)
    prompt = [*PROMPT, *_reply("first"), {"role": "user", "content": "q"}]
    rows = list(export_preference(engine))
    assert rows == [{"prompt": prompt, "chosen": _reply("y"), "rejected": _reply("x")}]


def test_exports_skip_incomplete_messages(engine: Engine, alice: int) -> None:
    _log(engine, alice, "c1", ["cut off", "also cut"], incomplete=True)
    record_feedback(engine, user_id=alice, completion_id="c1", choice_index=0, rating=1)
    record_feedback(engine, user_id=alice, completion_id="c1", choice_index=1, rating=-1)
    record_ranking(engine, user_id=alice, completion_id="c1", ranking=[0, 1])
    assert list(export_preference(engine)) == []
    assert list(export_kto(engine)) == []
    assert list(export_messages(engine)) == []


def test_exports_keep_soft_deleted_conversations_and_since_id_filters(
    engine: Engine, alice: int
) -> None:
    conv_id = _log(engine, alice, "c1", ["a", "b"])
    record_feedback(engine, user_id=alice, completion_id="c1", choice_index=0, rating=1)
    second = record_feedback(engine, user_id=alice, completion_id="c1", choice_index=1, rating=1)
    delete_conversation(engine, alice, conv_id)
    assert [r["completion"] for r in export_kto(engine)] == [_reply("a"), _reply("b")]
    assert [r["completion"] for r in export_kto(engine, since_id=second["id"] - 1)] == [_reply("b")]


def test_feedback_summary_counts_per_policy_version(engine: Engine, alice: int) -> None:
    _log(engine, alice, "c1", ["a", "b", "c"], policy_version="v1")
    _log(engine, alice, "c2", ["d"], policy_version="v2")
    for index, rating in [(0, 1), (1, 1), (2, -1)]:
        record_feedback(
            engine, user_id=alice, completion_id="c1", choice_index=index, rating=rating
        )
    record_feedback(engine, user_id=alice, completion_id="c2", choice_index=0, rating=-1)
    assert feedback_summary(engine) == {
        "v1": {"up": 2, "down": 1, "count": 3, "up_rate": pytest.approx(2 / 3)},
        "v2": {"up": 0, "down": 1, "count": 1, "up_rate": 0.0},
    }
