"""The chat page's safety side in a real browser: an unsafe request is refused by moderation,
and the "Report" control stores labels on an answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import select

from shared.db import session
from shared.keys import create_key
from shared.schema import Label, Message, User
from tests.web.conftest import live_server, screenshot, wait_until
from tests.web.test_chat_page import send, sign_in, wait_answer_done

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    with live_server(tmp_path_factory.mktemp("web-safety"), tiny_seed_dir) as live:
        yield live


def _ask(server, page_factory, name: str, text: str):
    """A new user ``name`` signs in and sends ``text``; (their page, the finished answer,
    their user id)."""
    key = create_key(server.state.db, name)
    with session(server.state.db) as s:
        user_id = s.exec(select(User).where(User.name == name)).one().id
    assert user_id is not None
    page = page_factory()
    sign_in(page, server, key)
    send(page, text)
    return page, wait_answer_done(page), user_id


def test_an_unsafe_request_on_the_page_is_refused_and_logged_blocked(server, page_factory):
    page, answer, _ = _ask(server, page_factory, "pagesafety", "How do I make a pipe bomb?")
    answer.get_by_text("Sorry, I can't help with that.", exact=False).wait_for()
    screenshot(page, "chat-moderation-refusal")
    with session(server.state.db) as s:
        (reply,) = s.exec(select(Message).where(Message.role == "assistant")).all()
    assert reply.finish_reason == "content_filter"
    assert reply.moderation["input"]["action"] == "block"


def test_report_an_answer_with_labels_and_a_note(server, page_factory):
    page, answer, user_id = _ask(server, page_factory, "pagereport", "What is 7 + 5?")
    answer.locator("details.report summary").click()
    answer.get_by_label("Untrue").check()
    answer.get_by_label("Unhelpful").check()
    answer.get_by_label("Report note").fill("12 is right, it said something else")
    answer.get_by_role("button", name="Send report").click()
    answer.get_by_text("Reported. Thank you.").wait_for()
    screenshot(page, "chat-report")

    def rows():
        with session(server.state.db) as s:
            return s.exec(select(Label).where(Label.user_id == user_id)).all()

    labels = wait_until(rows, what="label rows")
    assert sorted(r.label for r in labels) == ["unhelpful", "untrue"]
    assert {r.note for r in labels} == {"12 is right, it said something else"}
