"""Faults: a server restart. Conversations, ratings and rankings are all there, unchanged.
Figures go to the ``faults`` section of the reliability report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer
from tests.reliability._faults import Api


def test_server_restart_keeps_conversations_and_feedback(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    settings = Settings(data_dir=tmp_path, kv_cache_memory_mb=16, rate_limit_per_minute=0)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        key = create_key(app.state.palmchat.db, "carol")
        admin_key = create_key(app.state.palmchat.db, "root", admin=True)
        api, admin = Api(live.url, key), Api(live.url, admin_key)
        cids = []
        for i in range(4):
            r = api.chat(f"What is {i} + {i}?", n=2)
            assert r.status_code == 200
            cids.append(r.json()["id"])
            assert api.thumb(cids[-1], 0, 1 if i % 2 else -1).status_code == 200
        assert api.rank(cids[0], [1, 0]).status_code == 200
        conv = api.chat("And 5 + 5?", conversation_id=_conv(api, cids[0])).json()
        status, streamed, _, done = api.stream("Say hi.")
        assert status == 200 and done
        assert api.thumb(streamed, 0, 1).status_code == 200
        deleted = _conv(api, cids[3])
        assert api.http.delete(f"/v1/conversations/{deleted}").status_code in (200, 204)
        before = _snapshot(api, admin)
    assert len(before["conversations"]) == 4  # 4 chats + 1 stream, one deleted
    ratings = sum(1 for c in before["threads"].values() for m in c["messages"] if m["rating"])
    assert ratings == 4  # 5 votes, one in the deleted conversation
    assert len(before["kto"]) == 5 and before["preference"]  # deleted threads stay for training

    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        api, admin = Api(live.url, key), Api(live.url, admin_key)
        after = _snapshot(api, admin)
        assert after == before
        # the restarted server continues a conversation of the first one
        r = api.chat("And 6 + 6?", conversation_id=conv["conversation_id"])
        assert r.status_code == 200 and r.json()["conversation_id"] == conv["conversation_id"]
        assert api.thumb(cids[1], 1, 1).status_code == 200
    reliability_report.record(
        "faults",
        restart_conversations_kept=len(after["conversations"]),
        restart_ratings_kept=len(after["kto"]),
        restart_rankings_kept=1,
    )


def _conv(api: Api, cid: str) -> str:
    for c in api.http.get("/v1/conversations").json()["data"]:
        thread = api.http.get(f"/v1/conversations/{c['id']}").json()
        if any(m["completion_id"] == cid for m in thread["messages"]):
            return c["id"]
    raise AssertionError(f"{cid} is in no conversation")


def _snapshot(api: Api, admin: Api) -> dict[str, Any]:
    """The user's conversations with their ratings, and the admin's training exports."""
    conversations = api.http.get("/v1/conversations").json()["data"]
    threads = {c["id"]: api.http.get(f"/v1/conversations/{c['id']}").json() for c in conversations}
    exports = {
        fmt: admin.http.get("/v1/feedback/export", params={"format": fmt}).text.splitlines()
        for fmt in ("preference", "kto")
    }
    return {"conversations": conversations, "threads": threads, **exports}
