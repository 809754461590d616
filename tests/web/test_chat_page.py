"""The chat page in a real browser against a real server: sign in, stream, stop, thumbs with a
reason, compare and pick, regenerate, open and delete conversations, phone layout."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from sqlmodel import select

from shared.db import session
from shared.keys import create_key
from shared.schema import Conversation, Feedback, Message, Ranking
from shared.tokenizer import apply_chat_template
from tests.web.conftest import live_server, screenshot, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    with live_server(tmp_path_factory.mktemp("web-chat"), tiny_seed_dir) as live:
        yield live


@pytest.fixture
def user(server):
    """A fresh user per test, so each test sees only its own conversations."""
    import uuid

    name = f"u{uuid.uuid4().hex[:8]}"
    key = create_key(server.state.db, name)
    with session(server.state.db) as s:
        from shared.schema import User

        user_id = s.exec(select(User).where(User.name == name)).one().id
    return {"name": name, "key": key, "id": user_id}


def sign_in(page, server, key: str, max_tokens: int = 8) -> None:
    page.goto(server.url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#app").wait_for(state="visible")
    page.get_by_label("Max tokens").fill(str(max_tokens))
    page.get_by_label("Max tokens").dispatch_event("change")


def send(page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def wait_answer_done(page, index: int = -1):
    answers = page.locator("article.turn.assistant")
    answer = answers.nth(index) if index >= 0 else answers.last
    answer.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('article.turn.assistant')]"
        ".every(a => a.getAttribute('aria-busy') === 'false')"
    )
    return answer


def conversations_of(server, user_id: int) -> list[Conversation]:
    with session(server.state.db) as s:
        return list(
            s.exec(
                select(Conversation)
                .where(Conversation.user_id == user_id)
                .order_by(Conversation.created_at)
            ).all()
        )


def assert_logged_as_generated(server, answers: list[Message]) -> None:
    """Each answer's logged path from the root, rendered with the chat template, is exactly as
    long as the prompt the engine was given (its ``prompt_tokens``)."""
    tok = server.state.engine.tokenizer
    with session(server.state.db) as s:
        for answer in answers:
            path, node = [], s.get(Message, answer.parent_id)
            while node is not None:
                path.append({"role": node.role, "content": node.content})
                node = s.get(Message, node.parent_id) if node.parent_id else None
            rendered = apply_chat_template(tok, path[::-1], add_generation_prompt=True)
            assert len(rendered) == answer.prompt_tokens, (answer.content, path)


def assistant_messages(server, conversation_id: str) -> list[Message]:
    with session(server.state.db) as s:
        return list(
            s.exec(
                select(Message)
                .where(Message.conversation_id == conversation_id, Message.role == "assistant")
                .order_by(Message.id)
            ).all()
        )


def test_sign_in_send_and_watch_the_answer_stream(server, user, page_factory, slow_stream):
    slow_stream(0.04)
    page = page_factory()
    page.goto(server.url + "/")
    # a wrong key is refused with a message, and nothing else is shown
    page.get_by_label("API key").fill("pc-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    assert "not valid" in page.get_by_role("alert").first.inner_text(timeout=10_000)
    assert page.locator("#app").is_hidden()

    sign_in(page, server, user["key"], max_tokens=30)
    # the badge is filled from GET /v1/models after sign-in; wait for it rather than race it
    wait_until(
        lambda: page.locator("#policy-badge").inner_text() == "serving v1",
        what="the policy badge to show v1",
    )
    box = page.get_by_label("Message", exact=True)
    box.fill("first line")
    box.press("Shift+Enter")  # a new line, not a send
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.locator("article.turn").count() == 0
    box.press("Enter")
    assert box.input_value() == ""
    assert page.locator("article.turn.user .text").inner_text() == "first line\nsecond line"

    # it streams: part of the answer is on screen while the answer is still being written
    page.wait_for_function(
        "() => { const a = document.querySelector('article.turn.assistant[aria-busy=\"true\"]');"
        " return a && a.querySelector('.text').textContent.length > 0; }"
    )
    partial = page.locator("article.turn.assistant .text").text_content()
    assert page.get_by_role("button", name="Stop generating").is_visible()
    assert page.get_by_role("button", name="Send").is_disabled()
    screenshot(page, "chat-streaming")
    answer = wait_answer_done(page)
    final = answer.locator(".text").text_content()
    assert final.startswith(partial) and len(final) > len(partial)
    assert answer.locator(".version").inner_text() == "v1"
    assert page.get_by_role("button", name="Stop generating").is_hidden()

    # what the page showed is what the server logged, in a conversation in the sidebar
    [conv] = wait_until(lambda: conversations_of(server, user["id"]), what="conversation row")
    [stored] = assistant_messages(server, conv.id)
    assert stored.content == final and stored.policy_version == "v1"
    item = page.locator(f"#conversation-list li[data-id='{conv.id}']")
    item.wait_for()
    assert item.get_attribute("class") == "current"
    assert "first line" in item.inner_text()
    screenshot(page, "chat-answered")

    # the key survives a reload; the conversation opens again from the list
    page.reload()
    page.locator("#app").wait_for(state="visible")
    assert page.locator("article.turn").count() == 0
    page.get_by_role("button", name=re.compile("first line")).first.click()
    page.locator("article.turn.assistant").wait_for()
    assert page.locator("article.turn.assistant .text").text_content() == final
    assert page.locator("article.turn.assistant .version").inner_text() == "v1"


def test_stop_a_generation(server, user, page_factory, slow_stream):
    slow_stream(0.05)
    page = page_factory()
    sign_in(page, server, user["key"], max_tokens=200)
    send(page, "tell me a long story")
    page.wait_for_function(
        "() => document.querySelector('article.turn.assistant .text').textContent.length > 0"
    )
    page.get_by_role("button", name="Stop generating").click()
    answer = wait_answer_done(page)
    assert answer.locator(".choice-state").inner_text() == "stopped"
    assert page.get_by_role("button", name="Stop generating").is_hidden()
    assert page.get_by_role("button", name="Send").is_enabled()
    shown = answer.locator(".text").text_content()

    # the cut-off answer is stored as incomplete, far short of its 200 tokens, and the page
    # found the conversation it went into
    [conv] = wait_until(lambda: conversations_of(server, user["id"]), what="conversation row")
    [stored] = wait_until(lambda: assistant_messages(server, conv.id), what="stored answer")
    assert stored.incomplete and stored.finish_reason in (None, "cancelled")
    assert stored.completion_tokens < 200
    assert shown.startswith(stored.content) or stored.content.startswith(shown)
    page.locator(f"#conversation-list li.current[data-id='{conv.id}']").wait_for()

    # Escape stops too
    send(page, "and another one")
    page.wait_for_function(
        "() => document.querySelectorAll('article.turn.assistant')[1]"
        ".querySelector('.text').textContent.length > 0"
    )
    page.keyboard.press("Escape")
    answer = wait_answer_done(page, 1)
    assert answer.locator(".choice-state").inner_text() == "stopped"
    wait_until(lambda: len(assistant_messages(server, conv.id)) == 2, what="second answer row")
    assert len(conversations_of(server, user["id"])) == 1


def test_thumbs_up_with_a_reason_is_stored(server, user, page_factory):
    page = page_factory()
    sign_in(page, server, user["key"])
    send(page, "What is 7 + 5?")
    answer = wait_answer_done(page)
    answer.get_by_role("button", name="Good answer").click()
    expect_pressed = answer.get_by_role("button", name="Good answer")
    page.wait_for_function(
        "el => el.getAttribute('aria-pressed') === 'true'", arg=expect_pressed.element_handle()
    )
    reason = answer.get_by_label("Reason for your rating of Answer")
    assert reason.evaluate("el => el === document.activeElement")
    reason.fill("short and polite")
    reason.press("Enter")
    answer.get_by_text("Reason saved.").wait_for()
    screenshot(page, "chat-thumbs-up")

    def row():
        with session(server.state.db) as s:
            return s.exec(select(Feedback).where(Feedback.user_id == user["id"])).all()

    [fb] = wait_until(row, what="feedback row")
    assert fb.rating == 1 and fb.reason == "short and polite"
    with session(server.state.db) as s:
        message = s.get(Message, fb.message_id)
    assert message.role == "assistant" and message.policy_version == "v1"

    # changing the vote replaces it (one row per user and answer)
    bad = answer.get_by_role("button", name="Bad answer")
    bad.click()
    page.wait_for_function(
        "el => el.getAttribute('aria-pressed') === 'true'", arg=bad.element_handle()
    )
    assert answer.get_by_role("button", name="Good answer").get_attribute("aria-pressed") == "false"
    wait_until(lambda: row()[0].rating == -1, what="vote changed")
    assert len(row()) == 1


def test_compare_two_answers_and_pick_one(server, user, page_factory):
    page = page_factory()
    sign_in(page, server, user["key"], max_tokens=12)
    page.get_by_label("Compare 2 answers").check()
    send(page, "Reverse the word garden")
    answer = wait_answer_done(page)
    choices = answer.locator("section.choice")
    assert choices.count() == 2
    box0, box1 = choices.nth(0).bounding_box(), choices.nth(1).bounding_box()
    assert box1["x"] > box0["x"] + box0["width"] / 2  # side by side on a wide screen
    assert abs(box1["y"] - box0["y"]) < 2
    for i in range(2):
        assert choices.nth(i).locator(".version").inner_text() == "v1"
    page.get_by_role("button", name="Prefer answer 2").click()
    page.get_by_role("button", name="✓ Preferred").wait_for()
    assert "picked" in choices.nth(1).get_attribute("class")
    assert "not-picked" in choices.nth(0).get_attribute("class")
    screenshot(page, "chat-compare")

    def ranking():
        with session(server.state.db) as s:
            return s.exec(select(Ranking).where(Ranking.user_id == user["id"])).all()

    [rank] = wait_until(ranking, what="ranking row")
    [conv] = conversations_of(server, user["id"])
    first, second = assistant_messages(server, conv.id)
    assert (first.choice_index, second.choice_index) == (0, 1)
    assert rank.completion_id == first.completion_id == second.completion_id
    assert rank.ranking == [second.id, first.id]  # best first: the picked answer 2

    # the conversation goes on from the preferred answer
    page.get_by_label("Compare 2 answers").uncheck()
    send(page, "thanks")
    wait_answer_done(page)
    with session(server.state.db) as s:
        follow_up = s.exec(
            select(Message).where(Message.conversation_id == conv.id, Message.content == "thanks")
        ).one()
    assert follow_up.parent_id == second.id
    assert_logged_as_generated(server, assistant_messages(server, conv.id))


def test_regenerate_adds_a_sibling_answer(server, user, page_factory):
    page = page_factory()
    sign_in(page, server, user["key"], max_tokens=6)
    send(page, "hello")
    wait_answer_done(page)
    send(page, "what is 2 + 2?")
    wait_answer_done(page)
    [conv] = wait_until(lambda: conversations_of(server, user["id"]), what="conversation row")
    wait_until(lambda: len(assistant_messages(server, conv.id)) == 2, what="two answers")
    # only the last answer offers it (hidden buttons are not in the accessibility tree)
    regenerate = page.get_by_role("button", name="Regenerate this answer")
    assert regenerate.count() == 1
    assert page.locator("article.turn.assistant").last.locator(".regenerate").is_visible()
    regenerate.click()
    wait_answer_done(page)
    assert page.locator("article.turn.assistant").count() == 2
    answers = wait_until(
        lambda: (a := assistant_messages(server, conv.id)) and len(a) == 3 and a,
        what="regenerated answer",
    )
    assert answers[2].parent_id == answers[1].parent_id  # same prompt, new answer
    assert answers[2].completion_id != answers[1].completion_id
    assert_logged_as_generated(server, answers)
    assert len(conversations_of(server, user["id"])) == 1


def test_delete_a_conversation(server, user, page_factory):
    page = page_factory()
    sign_in(page, server, user["key"], max_tokens=4)
    for text in ("keep this one", "delete this one"):
        page.get_by_role("button", name="+ New chat").click()
        send(page, text)
        wait_answer_done(page)
        wait_until(
            lambda t=text: any(c.title == t for c in conversations_of(server, user["id"])),
            what="conversation row",
        )
    items = page.locator("#conversation-list li")
    wait_until(lambda: items.count() == 2, what="two conversations listed")
    page.get_by_role("button", name="Delete conversation: delete this one").click()
    wait_until(lambda: items.count() == 1, what="conversation removed from the list")
    assert "keep this one" in items.first.inner_text()
    assert page.locator("article.turn").count() == 0  # the open one was deleted: a new chat
    convs = {c.title: c for c in conversations_of(server, user["id"])}
    assert convs["delete this one"].deleted_at is not None
    assert convs["keep this one"].deleted_at is None
    r = httpx.get(
        f"{server.url}/v1/conversations/{convs['delete this one'].id}",
        headers={"Authorization": f"Bearer {user['key']}"},
    )
    assert r.status_code == 404
    page.reload()
    page.locator("#app").wait_for(state="visible")
    wait_until(lambda: items.count() == 1, what="list after reload")


def test_readable_on_a_phone(server, user, page_factory):
    page = page_factory(viewport={"width": 390, "height": 844})
    sign_in(page, server, user["key"], max_tokens=10)
    page.get_by_label("Compare 2 answers").check()
    send(page, "What is the capital of France?")
    answer = wait_answer_done(page)
    # no sideways scrolling; compare answers stack; the list hides behind the menu button
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    a, b = (answer.locator("section.choice").nth(i).bounding_box() for i in range(2))
    assert b["y"] >= a["y"] + a["height"] - 1 and a["x"] >= 0 and a["x"] + a["width"] <= 390
    menu = page.get_by_role("button", name="Show conversations")
    assert menu.is_visible() and menu.get_attribute("aria-expanded") == "false"
    assert not page.locator("#sidebar").evaluate("el => el.getBoundingClientRect().right > 0")
    screenshot(page, "phone-chat")
    menu.click()
    assert menu.get_attribute("aria-expanded") == "true"
    page.wait_for_function(
        "() => document.getElementById('sidebar').getBoundingClientRect().left >= 0"
    )
    assert page.get_by_role("button", name="+ New chat").evaluate(
        "el => el === document.activeElement"
    )
    screenshot(page, "phone-sidebar")


def test_keyboard_focus_is_visible_and_controls_are_labelled(server, user, page_factory):
    page = page_factory()
    page.goto(server.url + "/")
    key = page.get_by_label("API key")
    assert key.evaluate("el => el === document.activeElement")
    key.fill(user["key"])
    key.press("Enter")
    box = page.get_by_label("Message", exact=True)
    page.wait_for_function("el => el === document.activeElement", arg=box.element_handle())
    page.keyboard.press("Shift+Tab")
    focused = page.evaluate("document.activeElement.outerHTML")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", focused
    for button in page.locator("button:visible").all():
        name = button.get_attribute("aria-label") or button.inner_text().strip()
        assert name, button.evaluate("el => el.outerHTML")


def test_page_modules_rebuild_the_tree_and_compute_rates(server, page_factory):
    """The pure parts of the page (message tree → turns → history; /metrics → rates), run in
    the browser: the branch a conversation went on from, the newest regeneration, the picked
    compare answer."""
    page = page_factory()
    page.goto(server.url + "/")
    result = page.evaluate(
        """async () => {
          const { buildTurns, historyOf } = await import("/static/conversation.js");
          const { snapshot, rates } = await import("/static/metrics.js");
          const m = (id, parent_id, role, content, extra = {}) =>
            ({ id, parent_id, role, content, ...extra });
          const turns = buildTurns([
            m(1, null, "user", "hi"),
            m(2, 1, "assistant", "a0", { completion_id: "c1", choice_index: 0 }),
            m(3, 1, "assistant", "a1", { completion_id: "c1", choice_index: 1 }),
            m(4, 3, "user", "more"),
            m(5, 4, "assistant", "old", { completion_id: "c2", choice_index: 0 }),
            m(6, 4, "assistant", "new", { completion_id: "c3", choice_index: 0,
                                          policy_version: "v2", rating: 1 }),
          ]);
          const labels = '{endpoint="/v1/chat/completions",status="2xx",code=""}';
          const a = snapshot(`palmchat_requests_total${labels} 3\\n` +
            `palmchat_requests_created${labels} 1.7e9\\n` +
            'palmchat_generation_tokens_total 100\\npalmchat_policy_info{version="v1"} 1\\n', 0);
          const refused = '{endpoint="/v1/feedback",status="4xx",code="invalid_api_key"}';
          const b = snapshot(`palmchat_requests_total${labels} 7\\n` +
            `palmchat_requests_total${refused} 1\\n` +
            'palmchat_generation_tokens_total 300\\n', 2000);
          return { turns, history: historyOf(turns), a, r: rates(a, b),
                   restart: rates(b, { ...a, at: 4000 }) };
        }"""
    )
    turns = result["turns"]
    assert [t["kind"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1]["picked"] == 1 and [c["text"] for c in turns[1]["choices"]] == ["a0", "a1"]
    assert turns[3]["completionId"] == "c3" and turns[3]["alternatives"] == 2
    assert turns[3]["policyVersion"] == "v2" and turns[3]["choices"][0]["rating"] == 1
    assert result["history"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "new"},
    ]
    assert result["a"]["requests"] == 3 and result["a"]["policy"] == "v1"
    assert result["r"] == {
        "requests": 2.5,
        "errors": 0.5,
        "generationTokens": 100,
        "promptTokens": None,
    }
    assert result["restart"]["generationTokens"] == 50  # counter reset: counted from zero
