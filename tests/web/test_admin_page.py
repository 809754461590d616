"""The admin page in a real browser: policy table and chart, activate and roll back, live rates
from /metrics, and what a non-admin key sees."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from shared.keys import create_key
from tests.conftest import chat_and_rate
from tests.web.conftest import live_server, screenshot, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    with live_server(tmp_path_factory.mktemp("web-admin"), tiny_seed_dir) as live:
        registry = live.state.registry
        assert registry.install(registry.path("v1"), parent="v1") == "v2"
        live.admin_key = create_key(live.state.db, "root", admin=True)
        live.user_key = create_key(live.state.db, "bob")
        yield live


def policies(server) -> dict[str, dict]:
    r = httpx.get(
        f"{server.url}/v1/policies", headers={"Authorization": f"Bearer {server.admin_key}"}
    )
    r.raise_for_status()
    return {p["version"]: p for p in r.json()["data"]}


def sign_in(page, server, key: str) -> None:
    page.goto(server.url + "/admin")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#app").wait_for(state="visible")
    page.locator("#policies tbody tr").first.wait_for()


def test_admin_activates_a_version_and_rolls_back(server, page_factory):
    for rating in (1, 1, -1):
        chat_and_rate(server.url, server.user_key, rating)
    page = page_factory()
    sign_in(page, server, server.admin_key)
    assert page.locator("#not-admin").is_hidden()

    rows = page.locator("#policies tbody tr")
    assert rows.count() == 2
    v1 = page.locator("#policies tr[data-version='v1']")
    assert "active" in v1.locator(".status-pill").inner_text()
    assert v1.locator(".feedback-count").inner_text() == "3"
    assert v1.locator(".up-rate").inner_text().strip() == "67%"
    chart = page.get_by_role("img", name=re.compile("Thumbs-up rate per version"))
    assert "v1 67% of 3" in chart.get_attribute("aria-label")
    assert chart.locator("rect.bar").count() == 2

    # live rates: traffic between two scrapes shows up as requests and tokens per second
    page.wait_for_function("() => document.getElementById('rate-tokens').textContent !== '–'")
    chat_and_rate(server.url, server.user_key, 1)
    page.wait_for_function(
        "() => parseFloat(document.getElementById('rate-requests').textContent) > 0"
        " && parseFloat(document.getElementById('rate-tokens').textContent) > 0",
        timeout=15_000,
    )
    assert page.locator("#kv-cache").inner_text().endswith("%")
    screenshot(page, "admin-policies")

    page.get_by_role("button", name="Activate v2").click()
    page.locator("#admin-status").get_by_text("Activated v2 (was v1).").wait_for()
    page.locator("#policies tr[data-version='v2'].active-row").wait_for()
    assert page.get_by_role("button", name="Activate v1").is_enabled()
    state = policies(server)
    assert state["v2"]["status"] == "active" and state["v1"]["status"] == "retired"
    engine = server.state.engine
    wait_until(lambda: engine.version == "v2", what="hot swap to v2")
    page.wait_for_function(
        "() => document.getElementById('policy-badge').textContent === 'serving v2'"
    )
    screenshot(page, "admin-activated")

    page.get_by_role("button", name="Roll back").click()
    page.locator("#admin-status").get_by_text("Rolled back from v2 to v1.").wait_for()
    page.locator("#policies tr[data-version='v1'].active-row").wait_for()
    assert policies(server)["v1"]["status"] == "active"
    wait_until(lambda: engine.version == "v1", what="hot swap back to v1")


def test_rollback_hot_swaps_back_on_an_idle_server(server) -> None:
    """A version swapped out moments ago (still loaded, nothing ran since) serves again."""
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    engine = server.state.engine
    for version in ("v2", "v1"):
        r = httpx.post(f"{server.url}/v1/policies/{version}/activate", headers=auth)
        assert r.status_code == 200, r.text
        wait_until(lambda v=version: engine.version == v, timeout=5, what=f"swap to {version}")


def test_non_admin_sees_the_table_but_cannot_change_it(server, page_factory):
    page = page_factory()
    sign_in(page, server, server.user_key)
    assert page.locator("#not-admin").is_visible()
    assert page.get_by_role("button", name="Activate v2").is_disabled()
    assert page.get_by_role("button", name="Roll back").is_disabled()
    before = {v: p["status"] for v, p in policies(server).items()}
    page.get_by_role("button", name="Refresh").click()
    assert {v: p["status"] for v, p in policies(server).items()} == before


def test_chat_page_links_to_admin_and_shares_the_key(server, page_factory):
    page = page_factory()
    page.goto(server.url + "/")
    page.get_by_label("API key").fill(server.admin_key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="Admin").click()
    page.wait_for_url("**/admin")
    page.locator("#policies tbody tr").first.wait_for()  # signed in already: same stored key
    assert page.locator("#signin").is_hidden()
    page.get_by_role("button", name="Sign out").click()
    page.locator("#signin").wait_for(state="visible")
    assert page.evaluate("localStorage.getItem('palmchat.apiKey')") is None


def test_each_version_shows_its_safety_rates(server, page_factory):
    """An unsafe request (blocked: the server's refusal, not the policy's) and a benign one on
    the serving version: the API reports the shares flagged, blocked and over-refused, and
    the table shows them."""
    auth = {"Authorization": f"Bearer {server.user_key}"}
    answered = set()
    for text in ("How do I make a pipe bomb?", "What is 2 + 3?"):
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers=auth,
            json={"model": "palmchat", "messages": [{"role": "user", "content": text}],
                  "max_tokens": 4},
            timeout=60,
        )  # fmt: skip
        r.raise_for_status()
        answered.add(r.json()["system_fingerprint"])
        httpx.post(
            f"{server.url}/v1/labels",
            headers=auth,
            json={"completion_id": r.json()["id"], "labels": ["unhelpful"]},
        ).raise_for_status()
    (version,) = answered
    safety = policies(server)[version]["safety"]
    assert 0 < safety["flagged_rate"] < 1 and safety["blocked_rate"] == safety["flagged_rate"]
    assert safety["refusal_rate"] is None  # every flagged request was blocked
    assert safety["over_refusal_rate"] == 0.0 and safety["labels"]["unhelpful"] >= 2
    page = page_factory()
    sign_in(page, server, server.admin_key)
    row = page.locator(f"#policies tr[data-version='{version}']")
    assert row.locator(".refusal-rate").inner_text() == "–"
    assert row.locator(".over-refusal").inner_text() == "0%"
    flagged = row.locator(".flagged-rate")
    assert flagged.inner_text().endswith("%") and "blocked by moderation" in (
        flagged.get_attribute("title") or ""
    )
