"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.api.live import LiveServer


@pytest.fixture(scope="session")
def tiny_seed_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight policy version (BPE tokenizer) to stand in for the bundled seed."""
    import torch

    from demo.tasks import sft_conversations
    from shared.checkpoints import PolicyRegistry
    from shared.model import PaLM, PaLMConfig
    from shared.tokenizer import BPETokenizer

    texts = [m["content"] for c in sft_conversations(300, seed=0) for m in c]
    tok = BPETokenizer.train(texts, vocab_size=400)
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=tok.vocab_size, max_seq_len=256))
    registry = PolicyRegistry(tmp_path_factory.mktemp("tiny-seed"))
    return registry.path(registry.publish(model, tok))


@contextmanager
def live_app(
    data_dir: Path,
    seed_dir: Path,
    *,
    user: str | None = None,
    backend: str = "engine",
    **settings: Any,
) -> Iterator[LiveServer]:
    """A palmchat app with these settings on a real loopback server; ``live.state`` is its
    ``AppState``; with ``user``, ``live.key`` is a new API key of that user; ``backend`` as
    ``create_app`` takes it."""
    from server.api.app import create_app
    from shared.config import Settings
    from shared.keys import create_key

    app = create_app(Settings(data_dir=data_dir, **settings), seed_dir=seed_dir, backend=backend)
    with LiveServer(app) as live:
        live.state = app.state.palmchat
        if user is not None:
            live.key = create_key(live.state.db, user)
        yield live


async def ok_or_429(call: Awaitable[object]) -> int:
    """200 when an SDK call (a whole stream, if it streams) succeeds; 429 when it is refused as
    over capacity, which must come with a Retry-After header."""
    import openai

    try:
        await call
        return 200
    except openai.RateLimitError as e:  # streams too: before any chunk
        assert e.response.headers["retry-after"]
        return 429


def chat_and_rate(url: str, key: str, rating: int) -> None:
    """A short chat completion by ``key``'s user, then their thumbs (``rating``) on it."""
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers=auth,
        json={
            "model": "palmchat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        },
        timeout=60,
    )
    r.raise_for_status()
    httpx.post(
        f"{url}/v1/feedback",
        headers=auth,
        json={"completion_id": r.json()["id"], "rating": rating},
    ).raise_for_status()


PALMCHAT = [sys.executable, "-m", "palmchat"]  # the CLI as a user runs it, in its own process


def run_palmchat(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``palmchat`` CLI with ``args`` in a child process; its output captured as text."""
    return subprocess.run([*PALMCHAT, *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5"


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """The URL of a freshly created, uniquely named PostgreSQL database, dropped on exit.

    Outside CI an unreachable server skips the test; in CI (``CI=true``) it fails it, so a
    green CI run always means the PostgreSQL tests ran.
    """
    psycopg = pytest.importorskip("psycopg")
    name = f"palmchat_test_{uuid.uuid4().hex[:16]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 not reachable in CI: {exc}")
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 not reachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (:func:`fresh_postgres`) for one test."""
    with fresh_postgres() as url:
        yield url
