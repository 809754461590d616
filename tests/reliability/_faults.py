"""What the fault tests share: a caller of the chat API with one key, the OpenAI error shape,
and waiting for a condition."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


class Api:
    """A caller of the chat API with one key."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        self.key = key

    def chat(self, content: str, **extra: Any) -> httpx.Response:
        body = {
            "model": "palmchat",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            **extra,
        }
        return self.http.post("/v1/chat/completions", json=body)

    def stream(self, content: str) -> tuple[int, str | None, str, bool]:
        """(status, completion id, text, saw [DONE]) of an SSE chat."""
        body = {
            "model": "palmchat",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            "stream": True,
        }
        cid, text, done = None, "", False
        with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                cid = chunk["id"]
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
            return r.status_code, cid, text, done

    def thumb(self, cid: str, index: int, rating: int) -> httpx.Response:
        return self.http.post(
            "/v1/feedback", json={"completion_id": cid, "choice_index": index, "rating": rating}
        )

    def rank(self, cid: str, ranking: list[int]) -> httpx.Response:
        return self.http.post("/v1/rankings", json={"completion_id": cid, "ranking": ranking})


def is_openai_error(r: httpx.Response, status: int) -> bool:
    body = r.json()
    return (
        r.status_code == status
        and set(body) == {"error"}
        and set(body["error"]) == {"message", "type", "param", "code"}
    )


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
