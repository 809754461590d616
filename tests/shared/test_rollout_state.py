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
