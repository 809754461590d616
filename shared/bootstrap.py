"""First-run set-up of a data dir: database migrations, the bundled seed policy, the active row.

Every process (server, trainer, CLI) calls :func:`prepare` so that ``palmchat up`` on a fresh
machine needs no other step. It is idempotent and safe to run from several processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import select

from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.db import init_db, session
from shared.schema import Policy as PolicyRow
from shared.schema import utcnow

log = logging.getLogger(__name__)

SEED_DIR = Path(__file__).parent / "seed" / "policy"


@dataclass
class Prepared:
    engine: Engine
    registry: PolicyRegistry
    active_version: str


def active_version(engine: Engine) -> str | None:
    with session(engine) as s:
        row = s.exec(
            select(PolicyRow)
            .where(PolicyRow.status == "active")
            .order_by(PolicyRow.activated_at.desc())
        ).first()
        return row.version if row else None


def register_version(engine: Engine, registry: PolicyRegistry, version: str, status: str) -> None:
    """Record a registry version in the ``policies`` table (no-op if already there)."""
    manifest = registry.manifest(version)
    with session(engine) as s:
        if s.get(PolicyRow, version) is not None:
            return
        now = utcnow()
        s.add(
            PolicyRow(
                version=version,
                status=status,
                parent_version=manifest.get("parent"),
                metrics=manifest.get("metrics", {}),
                created_at=now,
                activated_at=now if status == "active" else None,
            )
        )


def prepare(settings: Settings, seed_dir: Path = SEED_DIR) -> Prepared:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = init_db(settings.database_url)
    registry = PolicyRegistry(settings.registry_dir)
    if not registry.versions():
        if not (seed_dir / "manifest.json").is_file():
            raise FileNotFoundError(
                f"no policy in {registry.root} and no seed policy at {seed_dir}"
            )
        version = registry.install(seed_dir)
        log.info("installed the seed policy as %s", version)
    for version in registry.versions():
        register_version(engine, registry, version, status="candidate")
    current = active_version(engine)
    if current is None:
        current = registry.versions()[0]
        with session(engine) as s:
            row = s.get(PolicyRow, current)
            row.status, row.activated_at = "active", utcnow()
            s.add(row)
    return Prepared(engine=engine, registry=registry, active_version=current)
