"""Tests of the database layer (shared/db.py, shared/schema.py, shared/migrations).

Every database test runs on SQLite (a file under tmp_path) and on the local PostgreSQL
(127.0.0.1:5432, user postgres, trust auth), where each test gets a fresh database that
is dropped afterwards. Deselect the latter with ``-m "not postgres"``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from shared.db import (
    DatabaseError,
    current_revision,
    downgrade,
    head_revision,
    init_db,
    make_engine,
    session,
    upgrade,
)
from shared.schema import (
    ApiKey,
    Conversation,
    Feedback,
    Message,
    Policy,
    Ranking,
    TrainerState,
    TrainingRun,
    User,
)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind; the SQLite file's directory does not exist yet."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'not-yet-created' / 'palmchat.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = init_db(db_url)
    yield eng
    eng.dispose()


def _user_and_message(engine: Engine) -> tuple[int, int]:
    with session(engine) as s:
        user = User(name="ada")
        s.add(user)
        s.flush()
        conv = Conversation(user_id=user.id)
        s.add(conv)
        s.flush()
        msg = Message(conversation_id=conv.id, role="assistant", content="hi")
        s.add(msg)
        s.flush()
        assert user.id is not None and msg.id is not None
        return user.id, msg.id


def test_upgrade_from_any_cwd_brings_empty_database_to_head(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no alembic.ini here: the config is built in code
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()


def test_upgrade_twice_is_idempotent_and_keeps_data(db_url: str) -> None:
    upgrade(db_url)
    eng = make_engine(db_url)
    try:
        with session(eng) as s:
            s.add(User(name="kept"))
        tables_before = set(inspect(eng).get_table_names())
        upgrade(db_url)
        assert current_revision(db_url) == head_revision()
        assert set(inspect(eng).get_table_names()) == tables_before
        with session(eng) as s:
            assert s.exec(select(User.name)).all() == [("kept",)]
    finally:
        eng.dispose()


def test_concurrent_upgrades_of_a_fresh_database_do_not_collide(db_url: str) -> None:
    n = 4
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            upgrade(db_url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert current_revision(db_url) == head_revision()


def test_downgrade_to_base_removes_all_tables_and_upgrade_restores_them(db_url: str) -> None:
    upgrade(db_url)
    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    eng = make_engine(db_url)
    try:
        assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
        upgrade(db_url)
        assert set(inspect(eng).get_table_names()) >= set(SQLModel.metadata.tables)
    finally:
        eng.dispose()


def test_migrations_produce_exactly_the_schema_of_the_models(engine: Engine) -> None:
    """Fails when a model changes without a matching migration."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, SQLModel.metadata)
    assert diff == []


def test_round_trip_of_every_table_keeps_json_and_aware_datetimes(engine: Engine) -> None:
    plus_two = timezone(timedelta(hours=2))
    activated = datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=plus_two)
    with session(engine) as s:
        user = User(name="ada")
        s.add(user)
        s.flush()
        assert user.id is not None
        key = ApiKey(user_id=user.id, key_hash=ApiKey.hash_key("pc-secret"), prefix="pc-secre")
        conv = Conversation(user_id=user.id, title="Greetings")
        s.add_all([key, conv])
        s.flush()
        system = Message(conversation_id=conv.id, role="system", content="Be brief.")
        s.add(system)
        s.flush()
        prompt = Message(conversation_id=conv.id, parent_id=system.id, role="user", content="Hi")
        s.add(prompt)
        s.flush()
        answers = [
            Message(
                conversation_id=conv.id,
                parent_id=prompt.id,
                role="assistant",
                content=f"Hello #{i}",
                policy_version="v1",
                sampling_params={"temperature": 0.7, "top_p": 0.9, "n": 2, "stop": ["\n"]},
                prompt_tokens=5,
                completion_tokens=3,
                completion_id="chatcmpl-abc",
                choice_index=i,
                finish_reason="stop",
                logprobs=[{"token": "Hello", "logprob": -0.25, "top": [["Hi", -1.5]]}],
                latency_ms=12.5,
                incomplete=i == 1,
            )
            for i in range(2)
        ]
        s.add_all(answers)
        s.flush()
        feedback = Feedback(message_id=answers[0].id, user_id=user.id, rating=-1, reason="meh")
        ranking = Ranking(
            completion_id="chatcmpl-abc", user_id=user.id, ranking=[answers[1].id, answers[0].id]
        )
        policy = Policy(
            version="v1",
            status="active",
            metrics={"reward": 0.5, "kl": [0.1]},
            activated_at=activated,
        )
        run = TrainingRun(
            algo="ppo",
            base_version="v0",
            candidate_version="v1",
            feedback_watermark=7,
            n_feedback=3,
        )
        state = TrainerState(key="feedback_watermark", value={"id": 7})
        s.add_all([feedback, ranking, policy, run, state])
    written = [user, key, conv, system, prompt, *answers, feedback, ranking, policy, run, state]

    with session(engine) as s:
        for obj in written:
            pk = inspect(obj).identity
            read = s.get(type(obj), pk)
            assert read is not None, obj
            assert read.model_dump() == obj.model_dump(), type(obj).__name__
            for value in read.model_dump().values():
                if isinstance(value, datetime):
                    assert value.tzinfo == UTC
        children = s.exec(
            select(Message.id).where(Message.parent_id == prompt.id).order_by(Message.choice_index)
        ).all()
        assert [c[0] for c in children] == [a.id for a in answers]
        read_policy = s.get(Policy, "v1")
        assert read_policy is not None and read_policy.activated_at == activated
        assert s.get(Message, system.id).sampling_params is None  # SQL NULL, not JSON null


def test_second_feedback_by_same_user_on_same_message_is_rejected(engine: Engine) -> None:
    user_id, message_id = _user_and_message(engine)
    with session(engine) as s:
        s.add(Feedback(message_id=message_id, user_id=user_id, rating=1))
    with pytest.raises(IntegrityError), session(engine) as s:
        s.add(Feedback(message_id=message_id, user_id=user_id, rating=-1))
    with session(engine) as s:
        assert s.exec(select(Feedback.rating)).all() == [(1,)]


@pytest.mark.parametrize("rating", [0, 2, -2])
def test_feedback_rating_other_than_plus_or_minus_one_is_rejected(
    engine: Engine, rating: int
) -> None:
    user_id, message_id = _user_and_message(engine)
    with pytest.raises(IntegrityError), session(engine) as s:
        s.add(Feedback(message_id=message_id, user_id=user_id, rating=rating))


def test_duplicate_choice_of_one_completion_is_rejected(engine: Engine) -> None:
    _, message_id = _user_and_message(engine)
    with session(engine) as s:
        conv_id = s.get(Message, message_id).conversation_id
    dup = {"role": "assistant", "content": "x", "completion_id": "chatcmpl-d", "choice_index": 0}
    with pytest.raises(IntegrityError), session(engine) as s:
        s.add_all([Message(conversation_id=conv_id, **dup) for _ in range(2)])


def test_message_in_missing_conversation_is_rejected_by_foreign_key(engine: Engine) -> None:
    with pytest.raises(IntegrityError), session(engine) as s:
        s.add(Message(conversation_id="no-such-conversation", role="user", content="hi"))


def test_session_commits_on_success_and_rolls_back_on_error(engine: Engine) -> None:
    with pytest.raises(RuntimeError), session(engine) as s:
        s.add(User(name="ghost"))
        s.flush()
        raise RuntimeError("boom")
    with session(engine) as s:
        s.add(User(name="real"))
    with session(engine) as s:
        assert s.exec(select(User.name)).all() == [("real",)]


def test_sqlite_file_is_created_in_wal_mode_with_foreign_keys_on(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "palmchat.db"
    eng = init_db(f"sqlite:///{path}")
    try:
        assert path.exists()
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0
    finally:
        eng.dispose()


@pytest.mark.parametrize(
    "url",
    ["postgres://u:pw@db/palmchat", "postgresql://u:pw@db/palmchat", "postgresql+psycopg://db/x"],
)
def test_postgres_urls_use_the_psycopg_driver(url: str) -> None:
    assert make_engine(url).url.drivername == "postgresql+psycopg"


@pytest.mark.parametrize("call", [init_db, upgrade, current_revision])
def test_unreachable_postgres_raises_database_error_without_password(
    call: Callable[[str], object],
) -> None:
    url = "postgresql://palmchat:s3cret-pw@127.0.0.1:1/palmchat"
    with pytest.raises(DatabaseError) as info:
        call(url)
    message = str(info.value)
    assert message.startswith(
        "cannot reach database postgresql+psycopg://palmchat:***@127.0.0.1:1/"
    )
    assert "s3cret-pw" not in message
    assert "\n" not in message


def test_malformed_url_raises_database_error() -> None:
    with pytest.raises(DatabaseError, match="invalid database URL"):
        make_engine("not a url")
