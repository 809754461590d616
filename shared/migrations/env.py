"""Alembic environment for palmchat.

Normally run through :func:`shared.db.upgrade`, which passes an open connection in
``config.attributes["connection"]`` (holding the migration lock). Without one, the URL
comes from the config's ``sqlalchemy.url`` or else from the palmchat settings, so
``alembic -c some.ini revision --autogenerate`` also works.
"""

from __future__ import annotations

import logging

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import shared.schema  # noqa: F401  (registers the tables on SQLModel.metadata)
from shared.db import make_engine

log = logging.getLogger("shared.migrations")
config = context.config
target_metadata = SQLModel.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from shared.config import get_settings

    return get_settings().database_url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only ALTER by rebuilding tables
        compare_type=True,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of executing it (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
