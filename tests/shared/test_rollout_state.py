"""Canary state in the policies table (``shared.rollout.state``): start, change the share,
promote, abort, the decision recorded; and the sticky per-user routing."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from shared.checkpoints import PolicyRegistry
from shared.db import init_db, session
from shared.model import PaLM, PaLMConfig
from shared.policies import activate, active_version
from shared.rollout.state import (
    Canary,
    abort_canary,
    canary_of,
    promote_canary,
    routes_to_canary,
    start_canary,
)
from shared.schema import Policy
from shared.store import Invalid, NotFound
from shared.tokenizer import ByteTokenizer


@pytest.fixture
def world(tmp_path: Path, tiny_seed_dir: Path) -> tuple[Engine, PolicyRegistry]:
    registry = PolicyRegistry(tmp_path / "policies")
    v1 = registry.install(tiny_seed_dir)
    registry.install(tiny_seed_dir, parent=v1)
    registry.install(tiny_seed_dir, parent=v1)
    engine = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    activate(engine, registry, v1)
    return engine, registry


def _row(engine: Engine, version: str) -> Policy:
    with session(engine) as s:
        row = s.get(Policy, version)
        assert row is not None
        return row


def test_a_canary_starts_changes_share_and_is_promoted(world) -> None:
    engine, registry = world
    assert canary_of(engine) is None
    started = start_canary(engine, registry, "v2", 0.1)
    assert canary_of(engine) == started and started.share == 0.1
    assert active_version(engine) == "v1"  # the active version stays
    moved = start_canary(engine, registry, "v2", 0.25)  # a new share, same rollout
    assert (moved.share, moved.started_at) == (0.25, started.started_at)
    with pytest.raises(Invalid, match="v2 is already in canary"):
        start_canary(engine, registry, "v3", 0.1)

    assert promote_canary(engine, "v2", {"by": "admin", "reason": "looks good"}) == "v1"
    assert active_version(engine) == "v2" and canary_of(engine) is None
    row = _row(engine, "v2")
    assert row.status == "active" and row.decision is not None
    assert (row.decision["action"], row.decision["by"]) == ("promote", "admin")
    assert _row(engine, "v1").status == "retired"
    with pytest.raises(Invalid, match="not in canary"):
        promote_canary(engine, "v2", {"by": "admin"})


def test_an_aborted_canary_is_rejected_and_bad_starts_are_refused(world) -> None:
    engine, registry = world
    start_canary(engine, registry, "v3", 0.5)
    abort_canary(engine, "v3", {"by": "rollout", "reason": "worse thumbs"})
    assert canary_of(engine) is None and active_version(engine) == "v1"
    row = _row(engine, "v3")
    assert row.status == "rejected" and row.decision is not None
    assert row.decision["action"] == "abort" and row.decision["reason"] == "worse thumbs"

    for share in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(Invalid, match="share"):
            start_canary(engine, registry, "v2", share)
    with pytest.raises(Invalid, match="active version"):
        start_canary(engine, registry, "v1", 0.1)
    with pytest.raises(NotFound):
        start_canary(engine, registry, "v9", 0.1)
    with pytest.raises(NotFound):
        abort_canary(engine, "v9", {})
    # a version whose tokenizer differs from the active one's cannot be served beside it
    tok = ByteTokenizer(300)
    other = registry.publish(PaLM(PaLMConfig.from_name("tiny", num_tokens=tok.vocab_size)), tok)
    with pytest.raises(Invalid, match="another tokenizer"):
        start_canary(engine, registry, other, 0.1)
    assert canary_of(engine) is None


def test_routing_is_sticky_per_user_and_near_the_share() -> None:
    canary = Canary("v2", 0.1, started_at=None)  # type: ignore[arg-type]
    users = [f"key-{i}" for i in range(4000)]
    first = [routes_to_canary(canary, u) for u in users]
    assert first == [routes_to_canary(canary, u) for u in users]  # the same every time
    assert 0.08 < sum(first) / len(users) < 0.12
    # a wider share keeps the users it had and adds others
    wider = [routes_to_canary(Canary("v2", 0.3, None), u) for u in users]  # type: ignore[arg-type]
    assert all(w for f, w in zip(first, wider, strict=True) if f)
    assert 0.27 < sum(wider) / len(users) < 0.33
    # another rollout draws its own users
    other = [routes_to_canary(Canary("v3", 0.1, None), u) for u in users]  # type: ignore[arg-type]
    assert other != first


def _answers(engine: Engine, version: str, ups: int, downs: int, tokens: int = 12) -> None:
    """``ups + downs`` logged answers of ``version``, thumbed by their user."""
    from itertools import count

    from shared.store import LoggedChoice, log_completion
    from shared.votes import record_feedback

    ids = _answers.__dict__.setdefault("ids", count())
    for rating in [1] * ups + [-1] * downs:
        cid = f"chatcmpl-{version}-{next(ids)}"
        log_completion(
            engine,
            user_id=1,
            completion_id=cid,
            messages=[{"role": "user", "content": "What is 2 + 2?"}],
            choices=[LoggedChoice(0, "4" * tokens, "stop", tokens)],
            prompt_tokens=9,
            policy_version=version,
            sampling_params={},
            latency_ms=1.0,
        )
        record_feedback(engine, user_id=1, completion_id=cid, choice_index=0, rating=rating)


@pytest.fixture
def rated(world) -> tuple[Engine, PolicyRegistry]:
    from shared.keys import create_key

    engine, registry = world
    create_key(engine, "rater")  # user 1
    return engine, registry


def test_live_thumbs_roll_a_worse_canary_back_and_promote_a_better_one(rated) -> None:
    from shared.rollout.live import decide_canary

    engine, registry = rated
    _answers(engine, "v1", 40, 0)  # before the canary: not its evidence
    start_canary(engine, registry, "v2", 0.5)
    _answers(engine, "v1", 20, 10)
    _answers(engine, "v2", 10, 20)
    decision, evidence = decide_canary(engine)
    assert (evidence.active.ups, evidence.active.downs) == (20, 10)
    assert (evidence.candidate.ups, evidence.candidate.downs) == (10, 20)
    assert decision.decision == "continue" and canary_of(engine) is not None  # too few yet
    _answers(engine, "v1", 84, 36)  # 70% up in all
    _answers(engine, "v2", 36, 84)  # 30% up
    decision, _ = decide_canary(engine)
    assert decision.decision == "rollback" and canary_of(engine) is None
    row = _row(engine, "v2")
    assert row.status == "rejected" and row.decision["by"] == "rollout"
    assert row.decision["evidence"]["canary"]["ups"] == 46

    start_canary(engine, registry, "v3", 0.5)
    _answers(engine, "v1", 60, 90)  # 40% up
    _answers(engine, "v3", 112, 38)  # 75% up
    decision, evidence = decide_canary(engine)
    assert evidence.active.n == 150  # counted since this canary started
    assert decision.decision == "promote" and active_version(engine) == "v3"
    assert _row(engine, "v3").decision["action"] == "promote"


def test_a_canary_liked_more_but_far_wordier_is_not_promoted(rated) -> None:
    from shared.rollout.live import decide_canary

    engine, registry = rated
    start_canary(engine, registry, "v2", 0.5)
    _answers(engine, "v1", 60, 90, tokens=10)
    _answers(engine, "v2", 112, 38, tokens=40)  # liked, and four times as long
    decision, evidence = decide_canary(engine)
    assert evidence.canary_summary.mean_answer_length == 40.0
    assert decision.decision == "rollback" and [v.guard for v in decision.vetoes] == ["length"]
    assert _row(engine, "v2").status == "rejected" and active_version(engine) == "v1"


def test_a_canary_liked_more_but_less_correct_on_its_gate_is_not_promoted(rated) -> None:
    from shared.rollout.live import decide_canary

    engine, registry = rated
    start_canary(engine, registry, "v2", 0.5)
    with session(engine) as s:  # what its promotion gate measured, on the same prompts
        row = s.get(Policy, "v2")
        row.metrics = {
            "gate": {"active": {"correct_rate": 0.70}, "candidate": {"correct_rate": 0.55}}
        }
        s.add(row)
    _answers(engine, "v1", 60, 90)
    _answers(engine, "v2", 112, 38)
    decision, _ = decide_canary(engine)
    assert decision.decision == "rollback" and [v.guard for v in decision.vetoes] == ["correctness"]
    assert active_version(engine) == "v1"
