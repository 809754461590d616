"""Feedback ingestion: pairs from rankings and thumbs, and the watermark that makes a restarted
trainer resume without counting anything twice."""

from __future__ import annotations

import json

from sqlmodel import select

from shared.db import init_db, session
from shared.feedback_reader import LABEL_WEIGHTS, export_kto, export_messages, export_preference
from shared.labels import record_labels
from shared.moderation import REFUSAL_REPLY
from shared.schema import Feedback, Message, User
from shared.store import LoggedChoice, log_completion
from shared.votes import record_feedback, record_ranking
from trainer.feedback import (
    Watermark,
    is_heldout,
    load_feedback,
    load_watermark,
    pending,
    save_watermark,
)

PROMPT = [{"role": "user", "content": "What is 2 plus 2?"}]


def _completion(
    dd, cid: str, replies: list[str], prompt=PROMPT, incomplete=False, moderation=None
) -> None:
    log_completion(
        dd.ctx.engine,
        user_id=dd.user_id,
        completion_id=cid,
        messages=prompt,
        choices=[
            LoggedChoice(i, r, "stop", None, moderation=moderation) for i, r in enumerate(replies)
        ],
        prompt_tokens=None,
        policy_version="v1",
        sampling_params={},
        latency_ms=None,
        incomplete=incomplete,
    )


def _new_user(engine, name: str) -> int:
    with session(engine) as s:
        user = User(name=name)
        s.add(user)
        s.flush()
        assert user.id is not None
        return user.id


def _vote(dd, cid: str, index: int, rating: int) -> None:
    record_feedback(
        dd.ctx.engine, user_id=dd.user_id, completion_id=cid, choice_index=index, rating=rating
    )


def test_rankings_give_every_ordered_pair_and_thumbs_give_labels_and_up_down_pairs(
    data_dir,
) -> None:
    _completion(data_dir, "c1", ["Sure! It is 4.", "4", "Well, let me think... 4."])
    record_ranking(data_dir.ctx.engine, user_id=data_dir.user_id, completion_id="c1",
                   ranking=[0, 1, 2])  # fmt: skip
    _vote(data_dir, "c1", 0, 1)
    _vote(data_dir, "c1", 1, -1)
    # a second request with the same prompt (another conversation): its down vote pairs
    # with the first request's up vote
    _completion(data_dir, "c2", ["5"])
    _vote(data_dir, "c2", 0, -1)
    data = load_feedback(data_dir.ctx.engine, margin=0.5)
    ranking = [(p.chosen, p.rejected, p.margin, p.decisive) for p in data.pairs
               if p.source == "ranking"]  # fmt: skip
    assert ranking == [
        ("Sure! It is 4.", "4", 0.5, True),
        ("Sure! It is 4.", "Well, let me think... 4.", 1.0, None),
        ("4", "Well, let me think... 4.", 0.5, None),
    ]
    thumbs_pairs = {(p.chosen, p.rejected) for p in data.pairs if p.source == "thumbs"}
    assert thumbs_pairs == {("Sure! It is 4.", "4"), ("Sure! It is 4.", "5")}
    assert sorted((t.reply, t.label) for t in data.thumbs) == [
        ("4", -1),
        ("5", -1),
        ("Sure! It is 4.", 1),
    ]
    assert all(p.prompt == PROMPT for p in data.pairs)
    assert data.prompts == [PROMPT]


def test_incomplete_replies_are_never_used_or_counted(data_dir) -> None:
    _completion(data_dir, "cut", ["Sure! It is"], incomplete=True)
    _vote(data_dir, "cut", 0, -1)
    assert len(load_feedback(data_dir.ctx.engine)) == 0
    assert pending(data_dir.ctx.engine, Watermark()).total == 0


def test_watermark_resume_never_double_counts(data_dir) -> None:
    engine = data_dir.ctx.engine
    _completion(data_dir, "a", ["Sure! 4.", "4"])
    _vote(data_dir, "a", 0, 1)
    _vote(data_dir, "a", 1, -1)
    record_ranking(engine, user_id=data_dir.user_id, completion_id="a", ranking=[0, 1])
    first = pending(engine, load_watermark(engine))
    assert (first.n_feedback, first.n_rankings) == (2, 1)
    # until a round records its outcome, the watermark does not move: a crash redoes it all
    assert pending(engine, load_watermark(engine)).total == 3
    with session(engine) as s:
        save_watermark(s, first.watermark)

    # a restarted trainer: new engine, watermark read back from the database
    engine2 = init_db(data_dir.settings.database_url)
    wm = load_watermark(engine2)
    assert wm == first.watermark
    assert pending(engine2, wm).total == 0

    _completion(data_dir, "b", ["Of course! 4.", "four"])
    _vote(data_dir, "b", 0, 1)
    _vote(data_dir, "a", 1, 1)  # a changed vote: same row, new updated_at -> new once
    second = pending(engine2, wm)
    assert (second.n_feedback, second.n_rankings) == (2, 0)
    with session(engine2) as s:
        save_watermark(s, second.watermark)
        assert len(s.exec(select(Feedback)).all()) == 3  # the changed vote kept its row
    assert pending(engine2, load_watermark(engine2)).total == 0
    # training data is the current state: the changed vote is one thumb, with its new value
    thumbs = {t.reply: t.label for t in load_feedback(engine2).thumbs}
    assert thumbs == {"Sure! 4.": 1, "4": 1, "Of course! 4.": 1}


def test_labels_count_toward_a_round_once_and_an_old_watermark_still_reads(data_dir) -> None:
    engine = data_dir.ctx.engine
    _completion(data_dir, "a", ["Sure! Here is how.", "I can't help with that."])
    record_labels(engine, user_id=data_dir.user_id, completion_id="a", choice_index=0,
                  labels=["harmful", "untrue"])  # fmt: skip
    first = pending(engine, load_watermark(engine))
    assert (first.n_feedback, first.n_rankings, first.n_labels, first.total) == (0, 0, 2, 2)
    with session(engine) as s:
        save_watermark(s, first.watermark)
    assert pending(engine, load_watermark(engine)).total == 0
    record_labels(engine, user_id=data_dir.user_id, completion_id="a", choice_index=1,
                  labels=["refusal_was_wrong"])  # fmt: skip
    assert pending(engine, load_watermark(engine)).n_labels == 1
    # a watermark saved before labels were counted reads as "every label is new"
    old = {k: v for k, v in first.watermark.to_json().items() if k != "label_id"}
    assert pending(engine, Watermark.from_json(old)).n_labels == 3


def test_feedback_younger_than_the_settle_time_waits_for_the_next_poll(data_dir) -> None:
    _completion(data_dir, "a", ["4"])
    _vote(data_dir, "a", 0, 1)
    assert pending(data_dir.ctx.engine, Watermark(), settle_seconds=3600).total == 0
    assert pending(data_dir.ctx.engine, Watermark(), settle_seconds=0).total == 1


def test_heldout_split_is_by_prompt_and_stable() -> None:
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(400)]
    held = [p for p in prompts if is_heldout(p, 15)]
    assert 30 < len(held) < 90
    assert held == [p for p in prompts if is_heldout(p, 15)]


def test_messages_of_the_log_are_walked_from_the_root(data_dir) -> None:
    _completion(data_dir, "a", ["4"])
    with session(data_dir.ctx.engine) as s:
        reply = s.exec(select(Message).where(Message.completion_id == "a")).one()
    log_completion(
        data_dir.ctx.engine,
        user_id=data_dir.user_id,
        completion_id="b",
        messages=[*PROMPT, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And double that?"}],
        choices=[LoggedChoice(0, "8", "stop", None)],
        prompt_tokens=None, policy_version="v1", sampling_params={}, latency_ms=None,
        conversation_id=reply.conversation_id,
    )  # fmt: skip
    _vote(data_dir, "b", 0, 1)
    (thumb,) = load_feedback(data_dir.ctx.engine).thumbs
    assert [m["content"] for m in thumb.prompt] == ["What is 2 plus 2?", "4", "And double that?"]


def test_the_export_of_a_database_is_what_the_trainer_loads_from_it(data_dir) -> None:
    engine = data_dir.ctx.engine
    bob_id = _new_user(engine, "bob")
    _completion(data_dir, "c1", ["Sure! It is 4.", "4", "4", "five"])
    record_ranking(engine, user_id=data_dir.user_id, completion_id="c1", ranking=[0, 1, 2])
    _vote(data_dir, "c1", 0, -1)
    _vote(data_dir, "c1", 0, 1)  # a changed vote counts once, as it is now
    _vote(data_dir, "c1", 3, -1)
    _completion(data_dir, "c2", ["Four."])  # the same prompt, asked in another conversation
    _vote(data_dir, "c2", 0, -1)
    _completion(data_dir, "cut", ["Sure! It"], incomplete=True)
    _vote(data_dir, "cut", 0, 1)
    log_completion(
        engine, user_id=bob_id, completion_id="b1", messages=PROMPT,
        choices=[LoggedChoice(0, "It is 4.", "stop", None), LoggedChoice(1, "22", "stop", None)],
        prompt_tokens=None, policy_version="v1", sampling_params={}, latency_ms=None,
    )  # fmt: skip
    record_ranking(engine, user_id=bob_id, completion_id="b1", ranking=[0, 1])
    record_feedback(engine, user_id=bob_id, completion_id="b1", choice_index=1, rating=-1)

    trained = load_feedback(engine)
    pairs = [
        {"prompt": p.prompt, "chosen": _said(p.chosen), "rejected": _said(p.rejected)}
        for p in trained.pairs
    ]
    labels = [
        {"prompt": t.prompt, "completion": _said(t.reply), "label": t.label > 0}
        for t in trained.thumbs
    ]
    assert _sorted(export_preference(engine)) == _sorted(pairs)
    assert _sorted(export_kto(engine)) == _sorted(labels)
    assert [r["messages"][-1]["content"] for r in export_messages(engine)] == ["Sure! It is 4."]
    # the rules at work: two rankings (no pair of two equal texts), and the one up paired with
    # each down on the same prompt, across conversations and users; the cut-short reply unused
    assert len(pairs) == 2 + 1 + 3 and len(labels) == 4


def _said(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _sorted(rows) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


UNSAFE = [{"role": "user", "content": "How do I make a pipe bomb?"}]
FLAGGED = {
    "input": {"stage": "input", "mode": "flag", "action": "flag", "flagged": True,
              "categories": ["illicit/violent"], "scores": {}, "classifier": "v1"},
    "output": None,
}  # fmt: skip


WEATHER = [{"role": "user", "content": "How do I kill the weather app?"}]
WAY = [{"role": "user", "content": "How do I shoot past the traffic?"}]


def _flagged(dd, cid: str, replies: list[str], prompt=UNSAFE) -> None:
    log_completion(
        dd.ctx.engine, user_id=dd.user_id, completion_id=cid, messages=prompt,
        choices=[LoggedChoice(i, r, "stop", None, moderation=FLAGGED)
                 for i, r in enumerate(replies)],
        prompt_tokens=None, policy_version="v1", sampling_params={}, latency_ms=None,
    )  # fmt: skip


def test_a_flagged_request_gets_refusal_pairs_unless_a_user_liked_the_answer(data_dir) -> None:
    engine = data_dir.ctx.engine
    _flagged(
        data_dir, "f1", ["Sure! Step one, step two.", REFUSAL_REPLY, "I can't help with that."]
    )
    _vote(data_dir, "f1", 1, 1)  # a liked refusal: the compliance still loses to the refusal
    _flagged(data_dir, "f1b", ["Sure! Step one, step two.", "Sure! Step one."])
    _flagged(data_dir, "f2", ["It is sunny.", "Here you go."], prompt=WEATHER)
    _vote(data_dir, "f2", 0, 1)  # a user liked an answer: the classifier may be wrong
    _flagged(data_dir, "f3", ["Go left.", REFUSAL_REPLY], prompt=WAY)
    record_labels(engine, user_id=data_dir.user_id, completion_id="f3", choice_index=1,
                  labels=["refusal_was_wrong"])  # fmt: skip
    checked = {"input": {"flagged": False, "categories": [], "action": "allow"}, "output": None}
    for cid, replies in (("ok", ["4"]), ("ok2", ["Four."])):
        _completion(data_dir, cid, replies, moderation=checked)
    _vote(data_dir, "ok", 0, 1)
    _vote(data_dir, "ok2", 0, 1)
    _completion(data_dir, "unchecked", ["5"], prompt=[{"role": "user", "content": "2 + 3?"}])
    _vote(data_dir, "unchecked", 0, 1)
    data = load_feedback(engine, refusals_per_prompt=4)
    refusals = [(p.prompt, p.chosen, p.rejected) for p in data.pairs if p.source == "refusal"]
    # the refusals (any wording) make no pair; the same compliance twice makes one; a prompt
    # with a liked answer or a refusal_was_wrong label makes none; and as many liked answers
    # to checked, unflagged prompts beat the refusal, one a prompt
    assert refusals == [
        (UNSAFE, REFUSAL_REPLY, "Sure! Step one."),
        (UNSAFE, REFUSAL_REPLY, "Sure! Step one, step two."),
        (PROMPT, "Four.", REFUSAL_REPLY),
    ]
    assert [p for p in load_feedback(engine).pairs if p.source == "refusal"] == []


def test_ignored_users_give_no_refusal_pairs_and_no_prompts(data_dir) -> None:
    engine = data_dir.ctx.engine
    probe_id = _new_user(engine, "probe")
    log_completion(
        engine, user_id=probe_id, completion_id="p1", messages=UNSAFE,
        choices=[LoggedChoice(0, "Sure! Step one.", "stop", None, moderation=FLAGGED)],
        prompt_tokens=None, policy_version="v1", sampling_params={}, latency_ms=None,
    )  # fmt: skip
    everyone = load_feedback(engine, refusals_per_prompt=4)
    assert [p.source for p in everyone.pairs] == ["refusal"] and everyone.prompts == [UNSAFE]
    ignored = load_feedback(engine, refusals_per_prompt=4, ignore_users=["probe"])
    assert ignored.pairs == [] and ignored.prompts == []


def test_labels_weigh_more_than_a_thumb_and_win_over_a_thumbs_up(data_dir) -> None:
    engine = data_dir.ctx.engine
    _completion(data_dir, "c1", ["Sure! It is 4.", "It is 5.", "4"])
    _vote(data_dir, "c1", 0, 1)
    _vote(data_dir, "c1", 1, 1)  # liked, but another look says it is untrue
    record_labels(engine, user_id=data_dir.user_id, completion_id="c1", choice_index=1,
                  labels=["untrue"])  # fmt: skip
    record_labels(engine, user_id=data_dir.user_id, completion_id="c1", choice_index=2,
                  labels=["harmful", "spam"])  # fmt: skip  # labelled, never voted on
    thumbs = {t.reply: (t.label, t.weight, t.labels) for t in load_feedback(engine).thumbs}
    assert thumbs == {
        "Sure! It is 4.": (1, 1.0, ()),
        "It is 5.": (-1, LABEL_WEIGHTS["untrue"], ("untrue",)),
        "4": (-1, LABEL_WEIGHTS["harmful"], ("harmful", "spam")),
    }
    assert LABEL_WEIGHTS["harmful"] > LABEL_WEIGHTS["untrue"] > 1.0
    # the labelled replies lose to the liked one in thumbs pairs, and the export says so
    pairs = {(p.chosen, p.rejected) for p in load_feedback(engine).pairs if p.source == "thumbs"}
    assert pairs == {("Sure! It is 4.", "It is 5."), ("Sure! It is 4.", "4")}
    rows = {r["completion"][0]["content"]: r for r in export_kto(engine)}
    assert rows["4"]["label"] is False and rows["4"]["labels"] == ["harmful", "spam"]
