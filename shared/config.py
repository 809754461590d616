"""The one settings object for every palmchat process.

Values come from the environment (prefix ``PALMCHAT_``) or a ``.env`` file, e.g.
``PALMCHAT_DATA_DIR=/srv/palmchat palmchat up``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PALMCHAT_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        Path("./palmchat-data"), description="Where the DB, registry and logs live."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty means a SQLite file in the data dir."
    )
    registry_dir: Path = Field(
        default_factory=lambda data: data["data_dir"] / "policies",
        description="Policy registry root; empty means <data_dir>/policies.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free one).")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    kv_cache_memory_mb: int = Field(256, description="Memory budget of the paged KV cache.")
    max_waiting: int = Field(
        256, description="Waiting-queue bound; beyond it requests are refused."
    )
    log_level: str = "INFO"
    policy_poll_seconds: float = Field(
        2.0, description="How often servers check the active policy."
    )
    rate_limit_per_minute: float = Field(
        600, description="Requests per minute per API key (0 = off)."
    )
    rate_limit_burst: int = Field(60, description="Requests a key may send at once.")
    max_body_bytes: int = Field(1_000_000, description="Largest accepted request body.")
    moderation_mode: Literal["off", "flag", "block"] = Field(
        "block",
        description="Chat moderation: off, flag (log and count only) or block (refuse a "
        "flagged request, end a flagged reply with content_filter).",
    )
    moderation_fail: Literal["open", "closed"] = Field(
        "open",
        description="With no working classifier: open serves unchecked, closed refuses.",
    )
    moderation_url: str = Field(
        "",
        description="An external OpenAI-compatible moderation API (e.g. http://guard:8000/v1); "
        "empty: palmchat's own classifier.",
    )
    moderation_api_key: str = Field("", description="Bearer key for moderation_url.")
    moderation_dir: Path = Field(
        default_factory=lambda data: data["data_dir"] / "moderation",
        description="Moderation classifier registry; empty means <data_dir>/moderation.",
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'palmchat.db').as_posix()}"
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
