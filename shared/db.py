"""Engines, sessions and migrations for the palmchat database (SQLite or PostgreSQL).

Typical use::

    engine = init_db(get_settings().database_url)  # migrate to head, then connect
    with session(engine) as s:
        s.add(User(name="ada"))

The schema is owned by the Alembic migrations shipped inside this package
(``shared/migrations``); nothing calls ``SQLModel.metadata.create_all``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlmodel import Session

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
# Key of the PostgreSQL advisory lock that serialises concurrent `upgrade` calls
# (e.g. server and trainer starting together). Any constant unique to this app will do.
_PG_MIGRATION_LOCK_KEY = 0x7A1C4A7


class DatabaseError(Exception):
    """The database cannot be reached or used; the message names the URL sans password."""


def _parse_url(url: str) -> URL:
    """Parse ``url`` and pin PostgreSQL URLs to the psycopg (v3) driver."""
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise DatabaseError(f"invalid database URL {url!r}: {exc}") from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def redact_url(url: str | URL) -> str:
    """``url`` as a string with the password replaced by ``***``."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except sa_exc.ArgumentError:
        return "<unparseable URL>"
    return parsed.render_as_string(hide_password=True)


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _on_sqlite_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    try:
        # busy_timeout first, so switching to WAL waits for other writers instead of failing.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        _set_wal(cursor)
        cursor.execute("PRAGMA foreign_keys = ON")
        # Safe with WAL (only the last transactions may be lost on power failure) and faster.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _set_wal(cursor: Any) -> None:
    """Switch to WAL. On a brand-new file two processes can race for the exclusive lock this
    needs, and SQLite then reports "locked" without consulting the busy handler: retry."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create an engine for ``url`` without connecting.

    SQLite: the parent directory is created; every connection gets WAL journaling,
    enforced foreign keys and a busy timeout, and may be used from any thread.
    PostgreSQL: ``postgres://`` and ``postgresql://`` URLs use the psycopg driver.
    """
    parsed = _parse_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
    if _is_sqlite(parsed):
        path = _sqlite_file(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    try:
        engine = create_engine(parsed, **kwargs)
    except (sa_exc.ArgumentError, ImportError) as exc:
        raise DatabaseError(f"cannot use database {redact_url(parsed)}: {exc}") from exc
    if _is_sqlite(parsed):
        event.listen(engine, "connect", _on_sqlite_connect)
    return engine


def _unreachable(url: URL, exc: BaseException) -> DatabaseError:
    """A :class:`DatabaseError` for ``exc`` with a one-line reason and no password in it."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    reason = lines[0] if lines else type(orig).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return DatabaseError(f"cannot reach database {redact_url(url)}: {reason}")


def ping(engine: Engine) -> None:
    """Check that ``engine`` can connect; raise :class:`DatabaseError` if not."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except sa_exc.DBAPIError as exc:
        raise _unreachable(engine.url, exc) from exc


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the migrations in this package; needs no alembic.ini.

    ``url`` (if given) is used by the ``alembic`` command-line style entry points;
    :func:`upgrade` hands its own connection to ``env.py`` instead.
    """
    cfg = Config()
    # ConfigParser interpolates '%', so escape it in paths and URLs.
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", str(_parse_url(url)).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest migration revision shipped with this package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise DatabaseError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


@contextmanager
def _migration_connection(url: str) -> Iterator[Connection]:
    """A connection inside one transaction that holds the app's migration lock.

    SQLite: foreign-key enforcement is switched off for the migration (batch mode
    rebuilds tables, which must not cascade) and ``BEGIN IMMEDIATE`` takes the write
    lock up front. PostgreSQL: a transaction-scoped advisory lock.
    """
    parsed = _parse_url(url)
    engine = make_engine(url)
    try:
        try:
            conn = engine.connect()
        except sa_exc.DBAPIError as exc:
            raise _unreachable(parsed, exc) from exc
        with conn:
            if _is_sqlite(parsed):
                conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif parsed.get_backend_name() == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK_KEY}
                )
            try:
                yield conn
                if _is_sqlite(parsed):
                    problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if problems:
                        raise DatabaseError(f"migration broke foreign keys: {problems[:5]}")
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``; a no-op when already there."""
    cfg = alembic_config()
    with _migration_connection(url) as conn:
        if revision == "head" and MigrationContext.configure(conn).get_current_revision() == (
            head_revision()
        ):
            log.debug("%s is at head already", redact_url(url))
            return
        cfg.attributes["connection"] = conn
        log.info("migrating %s to %s", redact_url(url), revision)
        command.upgrade(cfg, revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops everything)."""
    cfg = alembic_config()
    with _migration_connection(url) as conn:
        cfg.attributes["connection"] = conn
        log.info("downgrading %s to %s", redact_url(url), revision)
        command.downgrade(cfg, revision)


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at; ``None`` for an unmigrated database."""
    engine = make_engine(url)
    try:
        try:
            conn = engine.connect()
        except sa_exc.DBAPIError as exc:
            raise _unreachable(engine.url, exc) from exc
        with conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises.

    ``expire_on_commit`` is off, so objects stay readable after the block ends.
    """
    with Session(engine, expire_on_commit=False) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise


def init_db(url: str) -> Engine:
    """Migrate the database at ``url`` to head and return a connected-checked engine."""
    upgrade(url)
    engine = make_engine(url)
    ping(engine)
    return engine
