"""One live server per test module, the shape most API tests want; a module that needs other
settings defines its own ``server``."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.conftest import live_app


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path
):
    name = request.module.__name__.rsplit(".", 1)[-1]
    with live_app(
        tmp_path_factory.mktemp(name), tiny_seed_dir, kv_cache_memory_mb=16, user="alice"
    ) as live:
        live.auth = {"Authorization": f"Bearer {live.key}"}
        yield live


@pytest.fixture
def client(server) -> openai.OpenAI:
    """The official SDK, pointed at this module's server, with no retries to hide errors."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)
