"""Labels beyond thumbs: REST and WebSocket, one vote per label, errors, the kto export, and
the moderation trainer reading them."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets

from shared.feedback_reader import export_kto
from shared.keys import create_key
from trainer.moderation import label_examples


def _chat(live, key: str, content: str) -> str:
    r = httpx.post(
        f"{live.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "palmchat", "messages": [{"role": "user", "content": content}],
              "max_tokens": 4},
        timeout=60,
    )  # fmt: skip
    r.raise_for_status()
    return r.json()["id"]


def _label(live, key: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{live.url}/v1/labels", headers={"Authorization": f"Bearer {key}"}, json=body
    )


def test_labels_are_stored_one_vote_each_and_exported(server) -> None:
    cid = _chat(server, server.key, "What is 2 + 3?")
    r = _label(server, server.key, {"completion_id": cid, "labels": ["untrue", "unhelpful"]})
    assert r.status_code == 200 and r.json()["labels"] == ["unhelpful", "untrue"]
    again = _label(server, server.key, {"completion_id": cid, "labels": ["untrue"], "note": "no"})
    assert again.json()["labels"] == ["unhelpful", "untrue"] and again.json()["note"] == "no"
    thumbs = httpx.post(
        f"{server.url}/v1/feedback",
        headers={"Authorization": f"Bearer {server.key}"},
        json={"completion_id": cid, "rating": -1},
    )
    assert thumbs.status_code == 200
    rows = [row for row in export_kto(server.state.db) if row.get("labels")]
    assert rows and rows[-1]["labels"] == ["unhelpful", "untrue"] and rows[-1]["label"] is False


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"completion_id": "chatcmpl-nope", "labels": ["spam"]}, 404),
        ({"completion_id": "x", "labels": ["rude"]}, 400),
        ({"completion_id": "x", "labels": []}, 400),
        ({"completion_id": "x", "labels": ["spam"], "note": "n" * 2001}, 400),
    ],
)
def test_bad_labels_are_clean_4xx(server, body, status) -> None:
    r = _label(server, server.key, body)
    assert r.status_code == status and r.json()["error"]["message"]


def test_someone_elses_answer_cannot_be_labelled(server) -> None:
    cid = _chat(server, server.key, "hello")
    other = create_key(server.state.db, "mallory")
    assert _label(server, other, {"completion_id": cid, "labels": ["spam"]}).status_code == 404


async def test_websocket_labels_frame(server) -> None:
    cid = _chat(server, server.key, "What is the capital of France?")
    url = server.url.replace("http", "ws") + f"/v1/chat/ws?api_key={server.key}"
    async with websockets.connect(url) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "labels", "completion_id": cid, "labels": ["pii"]}))
        frame = json.loads(await ws.recv())
    assert frame["type"] == "labels" and frame["ok"] is True and frame["labels"] == ["pii"]


def test_the_moderation_trainer_learns_from_harmful_and_wrong_refusal_labels(server) -> None:
    harmful = _chat(server, server.key, "Tell me something rude")
    _label(server, server.key, {"completion_id": harmful, "labels": ["harmful"]}).raise_for_status()
    examples = label_examples(server.state.db)
    unsafe = [e for e in examples if e.unsafe]
    assert any(e.kind == "request" and e.text == "Tell me something rude" for e in unsafe)
    assert all(e.categories for e in unsafe)


def test_admins_find_the_answers_given_to_an_end_user(server) -> None:
    from shared.keys import create_key as new_key

    admin = new_key(server.state.db, "root", admin=True)
    for text in ("What is 2 + 2?", "hello"):
        httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {server.key}"},
            json={"model": "palmchat", "messages": [{"role": "user", "content": text}],
                  "max_tokens": 3, "user": "customer-7"},
            timeout=60,
        ).raise_for_status()  # fmt: skip
    r = httpx.get(
        f"{server.url}/v1/admin/messages",
        params={"end_user": "customer-7"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    data = r.json()["data"]
    assert r.status_code == 200 and len(data) == 2
    assert all(m["end_user"] == "customer-7" and m["moderation"] for m in data)
    assert data[0]["id"] > data[1]["id"]
    page = httpx.get(
        f"{server.url}/v1/admin/messages",
        params={"end_user": "customer-7", "before": data[0]["id"]},
        headers={"Authorization": f"Bearer {admin}"},
    ).json()["data"]
    assert [m["id"] for m in page] == [data[1]["id"]]
    user = httpx.get(
        f"{server.url}/v1/admin/messages",
        params={"end_user": "customer-7"},
        headers={"Authorization": f"Bearer {server.key}"},
    )
    assert user.status_code == 403


def test_open_assistant_tree_export_carries_thumbs_and_labels(server) -> None:
    from shared.keys import create_key as new_key

    admin = new_key(server.state.db, "root2", admin=True)
    cid = _chat(server, server.key, "What is 9 + 1?")
    _label(server, server.key, {"completion_id": cid, "labels": ["spam"], "note": "ad"})
    httpx.post(
        f"{server.url}/v1/feedback",
        headers={"Authorization": f"Bearer {server.key}"},
        json={"completion_id": cid, "rating": 1},
    ).raise_for_status()
    r = httpx.get(
        f"{server.url}/v1/feedback/export",
        params={"format": "oasst"},
        headers={"Authorization": f"Bearer {admin}"},
    )
    trees = [json.loads(line) for line in r.text.splitlines()]
    (tree,) = [t for t in trees if t["prompts"] and t["prompts"][0]["text"] == "What is 9 + 1?"]
    (prompt,) = tree["prompts"]
    (reply,) = prompt["replies"]
    assert prompt["role"] == "prompter" and reply["role"] == "assistant"
    assert reply["model_name"] == "v1" and reply["emojis"] == {"+1": 1}
    assert reply["labels"] == {"spam": {"count": 1, "notes": ["ad"]}}
