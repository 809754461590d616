"""Browser fixtures: Debian's Chromium driven by Playwright, and a live palmchat server.

Playwright's own browser download does not work offline, so the tests drive the system
``chromium``. Outside CI a missing browser or ``playwright`` package skips the tests; in CI
(``CI=true``, where ``.ci/run`` installs both) it fails them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.api import serving
from tests.conftest import LiveServer, live_app

CHROMIUM = os.environ.get("PALMCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"


def unavailable(reason: str) -> None:
    """Skip, or fail in CI, where the browser is installed on purpose."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator:
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        except Error as e:
            unavailable(f"Chromium at {CHROMIUM} does not start: {e}")
        yield b
        b.close()


@pytest.fixture
def page_factory(browser) -> Iterator[Callable]:
    """New isolated pages (own localStorage); console errors and page errors fail the test."""
    contexts, problems = [], []

    def make(viewport: dict | None = None):
        ctx = browser.new_context(viewport=viewport or {"width": 1280, "height": 860})
        ctx.set_default_timeout(20_000)
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on(
            "console",
            lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )
        return page

    yield make
    for ctx in contexts:
        ctx.close()
    # The pages report failed API calls (404 after a delete, 403 of the admin probe) as
    # console errors of the network layer; script errors are what must not happen.
    real = [p for p in problems if "Failed to load resource" not in p]
    assert not real, real


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def live_server(tmp_path: Path, seed_dir: Path) -> contextlib.AbstractContextManager[LiveServer]:
    return live_app(
        tmp_path, seed_dir, kv_cache_memory_mb=16, rate_limit_per_minute=0, policy_poll_seconds=0.5
    )


@pytest.fixture
def slow_stream(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Make the served generations slow and long (no early end token) so a test can watch
    them stream and stop them; the server runs in this process, so patching works."""

    def apply(delay: float = 0.05) -> None:
        run_engine, prepare = serving.run_engine, serving.prepare_completion

        def prepare_long(state, req, who, messages=None):
            return prepare(state, req.model_copy(update={"ignore_eos": True}), who, messages)

        async def run_slow(state, c):
            async with contextlib.aclosing(run_engine(state, c)) as deltas:
                async for delta in deltas:
                    yield delta
                    await asyncio.sleep(delay)

        monkeypatch.setattr(serving, "prepare_completion", prepare_long)
        monkeypatch.setattr(serving, "run_engine", run_slow)

    return apply


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
