"""First-run set-up of a data dir: database migrations, the bundled seed policy, the active row,
the bundled moderation classifier.

Every process (server, trainer, CLI) calls :func:`prepare` so that ``palmchat up`` on a fresh
machine needs no other step. It is idempotent and safe to run from several processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.db import init_db
from shared.moderation import ModerationRegistry
from shared.policies import activate, active_version, register_version

log = logging.getLogger(__name__)

SEED_DIR = Path(__file__).parent / "seed" / "policy"
SEED_MODERATION_DIR = Path(__file__).parent / "seed" / "moderation" / "v1"


@dataclass
class Prepared:
    engine: Engine
    registry: PolicyRegistry
    active_version: str
    moderation: ModerationRegistry


def prepare(
    settings: Settings, seed_dir: Path = SEED_DIR, moderation_seed: Path = SEED_MODERATION_DIR
) -> Prepared:
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
        activate(engine, registry, current)
    moderation = ModerationRegistry(settings.moderation_dir)
    if not moderation.versions() and (moderation_seed / "manifest.json").is_file():
        log.info(
            "installed the bundled moderation classifier as %s", moderation.install(moderation_seed)
        )
    return Prepared(engine=engine, registry=registry, active_version=current, moderation=moderation)
