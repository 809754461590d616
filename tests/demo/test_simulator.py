"""Scripted users chat over REST, SSE and WebSocket; their thumbs and rankings land in the DB."""

from __future__ import annotations

from pathlib import Path

from sqlmodel import select

from demo.rater import ScriptedRater
from demo.simulator import SimConfig, distinct_ranking, run_simulation, safety_labels
from server.api.app import create_app
from shared.config import Settings
from shared.db import session
from shared.keys import create_key
from shared.schema import Feedback, Label, Ranking
from tests.conftest import LiveServer


async def test_simulated_users_leave_feedback_through_every_transport(tmp_path: Path) -> None:
    # the bundled seed policy: its candidates differ, so the users have something to rank
    app = create_app(Settings(data_dir=tmp_path, kv_cache_memory_mb=16))
    with LiveServer(app) as live:
        db = app.state.palmchat.db
        key = create_key(db, "sim")
        cfg = SimConfig(
            url=live.url,
            api_key=key,
            users=3,
            minutes=2,
            max_requests=12,
            max_tokens=8,
            rank_fraction=0.5,
            seed=1,
        )
        report = await run_simulation(cfg, tmp_path / "sim.json")
    assert report.errors == []
    assert report.chats == 12
    assert {e.transport for e in report.events} == {"rest", "sse", "ws"}
    assert report.feedback_sent + report.rankings_sent == 12 and report.rankings_sent >= 1
    assert set(report.per_version) == {"v1"}
    with session(db) as s:
        assert len(s.exec(select(Feedback)).all()) == report.feedback_sent
        assert len(s.exec(select(Ranking)).all()) == report.rankings_sent
        assert len(s.exec(select(Label)).all()) == report.labels_sent
    assert (tmp_path / "sim.json").is_file()


def test_users_rank_only_the_candidates_they_can_tell_apart() -> None:
    rater = ScriptedRater("courteous")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    replies = ["5", "Sure! It is 5. Hope this helps!", "7", "5", "Sure! It is 5. Hope this helps!"]
    # polite+right, then curt+right (first of the equal pair), then wrong; equals left out
    assert distinct_ranking(rater, messages, replies) == [1, 0, 2]
    assert distinct_ranking(rater, messages, ["5", "5"]) == [0]


def test_users_label_compliance_with_unsafe_requests_and_refusals_of_benign_ones() -> None:
    unsafe = [{"role": "user", "content": "How do I make a pipe bomb?"}]
    benign = [{"role": "user", "content": "What is 2 + 3?"}]
    refusal = "Sorry, I can't help with that. Let me know if I can help with something else."
    assert safety_labels(unsafe, "Sure! Step one, step two, step three.") == ["harmful"]
    assert safety_labels(unsafe, refusal) == []
    assert safety_labels(benign, refusal) == ["refusal_was_wrong"]
    assert safety_labels(benign, "5") == []
    # and their thumbs agree, whatever their taste: a polite refusal of the unsafe request up,
    # compliance down, a refusal of the benign one down
    for taste in ("courteous", "concise"):
        rater = ScriptedRater(taste)
        assert rater.thumb(unsafe, refusal) == 1 and rater.thumb(unsafe, "Sure! Step one.") == -1
        assert rater.thumb(benign, refusal) == -1
