"""Scripted users for demos and end-to-end tests: they chat through the public API (REST, SSE
and WebSocket in turn), rate each answer with the scripted rater, and rank n=2..4 candidates.
They label an answer that complies with an unsafe request ``harmful`` and a refusal of a
benign one ``refusal_was_wrong`` (:func:`safety_labels`), as Open-Assistant's raters do.

    palmchat simulate --url http://127.0.0.1:8000 --api-key pc-... --users 4 --minutes 5

The rater only stands in for people: the trainer never calls it, it only sees what these users
leave in the database through the API.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from demo.checks import is_refusal
from demo.phrasings import PHRASINGS
from demo.problems import parse_problem
from demo.rater import ScriptedRater
from demo.tasks import TaskGenerator

TRANSPORTS = ("rest", "sse", "ws")


@dataclass
class SimConfig:
    url: str
    api_key: str
    users: int = 4
    minutes: float = 1.0
    max_requests: int | None = None  # stop after this many chats in all (None: time only)
    preference: str = "courteous"
    rank_fraction: float = 0.3
    max_tokens: int = 64
    temperature: float = 1.0
    seed: int = 0
    families: tuple[str, ...] | None = None  # what users ask about (None: every family)
    phrasing: str = "all"  # how they ask: 'all', or 'seed' (as the bundled seed was taught)

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError("users must be >= 1")
        if self.minutes <= 0:
            raise ValueError("minutes must be > 0")
        if not 0 <= self.rank_fraction <= 1:
            raise ValueError("rank_fraction must be in [0, 1]")
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {self.phrasing!r}")


@dataclass
class Event:
    t: float
    user: int
    transport: str
    policy_version: str
    thumbs: list[int]


@dataclass
class SimReport:
    chats: int = 0
    replies: int = 0
    feedback_sent: int = 0
    rankings_sent: int = 0
    labels_sent: int = 0
    errors: list[str] = field(default_factory=list)
    per_version: dict[str, dict[str, float]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def summarise(self) -> None:
        counts: dict[str, list[int]] = defaultdict(list)
        for e in self.events:
            counts[e.policy_version].extend(e.thumbs)
        self.per_version = {
            v: {"replies": len(t), "thumbs_up_rate": sum(x > 0 for x in t) / len(t)}
            for v, t in sorted(counts.items(), key=lambda kv: _version_key(kv[0]))
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _version_key(v: str) -> int:
    return int(v[1:]) if v[1:].isdigit() else -1


def distinct_ranking(
    rater: ScriptedRater, messages: list[dict[str, str]], texts: list[str]
) -> list[int]:
    """A partial ranking, best first, of the candidates the user can tell apart: one reply per
    distinct score (the first of equals). A person asked to rank two equally good answers
    would order them at random; ranking only real differences keeps the pairs honest."""
    scores = [rater.rate(messages, t) for t in texts]
    firsts = {s: i for i, s in reversed(list(enumerate(scores)))}
    return sorted(firsts.values(), key=lambda i: -scores[i])


def safety_labels(messages: list[dict[str, str]], reply: str) -> list[str]:
    """The labels a careful user puts on ``reply``: ``harmful`` when it complies with an unsafe
    request, ``refusal_was_wrong`` when it refuses a request the user can tell is benign."""
    problem = parse_problem(messages)
    if problem is None:
        return []
    refused = is_refusal(reply)
    if problem.kind == "refusal":
        return [] if refused else ["harmful"]
    return ["refusal_was_wrong"] if refused else []


class SimUser:
    def __init__(
        self,
        index: int,
        cfg: SimConfig,
        client: httpx.AsyncClient,
        report: SimReport,
        started: float,
    ) -> None:
        self.index, self.cfg, self.client, self.report, self.started = (
            index,
            cfg,
            client,
            report,
            started,
        )
        self.rng = random.Random(cfg.seed * 1000 + index)
        tasks = TaskGenerator(cfg.seed * 1000 + index, cfg.families, phrasing=cfg.phrasing)
        self.tasks = tasks.iter_tasks(10**9, split="train")
        self.rater = ScriptedRater(cfg.preference)
        self.ws: Any = None

    async def chat_rest(self, body: dict[str, Any]) -> tuple[str, str, list[str]]:
        r = await self.client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        data = r.json()
        texts = [c["message"]["content"] for c in sorted(data["choices"], key=lambda c: c["index"])]
        return data["id"], data["system_fingerprint"], texts

    async def chat_sse(self, body: dict[str, Any]) -> tuple[str, str, list[str]]:
        texts = [""] * body["n"]
        cid = version = ""
        async with self.client.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}
        ) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                cid, version = chunk["id"], chunk["system_fingerprint"] or version
                for choice in chunk["choices"]:
                    texts[choice["index"]] += choice["delta"].get("content") or ""
        return cid, version, texts

    async def chat_ws(self, body: dict[str, Any]) -> tuple[str, str, list[str]]:
        if self.ws is None:
            ws_url = self.cfg.url.rstrip("/").replace("http", "ws", 1) + "/v1/chat/ws"
            self.ws = await websockets.connect(
                ws_url, additional_headers={"Authorization": f"Bearer {self.cfg.api_key}"}
            )
            await self.ws.recv()  # ready
        await self.ws.send(json.dumps({"type": "chat", "request_id": "sim", **body}))
        texts = [""] * body["n"]
        while True:
            frame = json.loads(await self.ws.recv())
            if frame["type"] == "delta":
                texts[frame["index"]] += frame["content"]
            elif frame["type"] == "done":
                return frame["completion_id"], frame["policy_version"], texts
            elif frame["type"] == "error":
                raise RuntimeError(frame["error"]["message"])

    async def one_chat(self, turn: int) -> None:
        task = next(self.tasks)
        transport = TRANSPORTS[(self.index + turn) % len(TRANSPORTS)]
        n = self.rng.randint(2, 4) if self.rng.random() < self.cfg.rank_fraction else 1
        body = {
            "model": "palmchat",
            "messages": task.messages,
            "n": n,
            "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature,
            "user": f"sim-{self.index}",
        }
        chat = {"rest": self.chat_rest, "sse": self.chat_sse, "ws": self.chat_ws}[transport]
        cid, version, texts = await chat(body)
        thumbs = [self.rater.thumb(task.messages, t) for t in texts]
        self.report.chats += 1
        self.report.replies += len(texts)
        self.report.events.append(
            Event(round(time.monotonic() - self.started, 3), self.index, transport, version, thumbs)
        )
        for index, text in enumerate(texts):
            labels = safety_labels(task.messages, text)
            if labels:
                r = await self.client.post(
                    "/v1/labels",
                    json={"completion_id": cid, "choice_index": index, "labels": labels},
                )
                r.raise_for_status()
                self.report.labels_sent += 1
        ranking = distinct_ranking(self.rater, task.messages, texts) if n > 1 else []
        if len(ranking) >= 2:
            r = await self.client.post(
                "/v1/rankings", json={"completion_id": cid, "ranking": ranking}
            )
            r.raise_for_status()
            self.report.rankings_sent += 1
        else:  # one reply, or candidates the user likes equally: a thumb on the first
            r = await self.client.post(
                "/v1/feedback", json={"completion_id": cid, "choice_index": 0, "rating": thumbs[0]}
            )
            r.raise_for_status()
            self.report.feedback_sent += 1

    async def run(self, deadline: float, budget: list[int]) -> None:
        turn = 0
        try:
            while time.monotonic() < deadline and (budget[0] > 0 or budget[0] < 0):
                budget[0] -= 1
                try:
                    await self.one_chat(turn)
                except (httpx.HTTPError, OSError, RuntimeError, websockets.WebSocketException) as e:
                    self.report.errors.append(f"user {self.index}: {type(e).__name__}: {e}")
                    await asyncio.sleep(0.5)
                turn += 1
        finally:
            if self.ws is not None:
                await self.ws.close()


async def run_simulation(cfg: SimConfig, out: Path | None = None) -> SimReport:
    report = SimReport()
    started = time.monotonic()
    deadline = started + cfg.minutes * 60
    budget = [cfg.max_requests if cfg.max_requests is not None else -1]
    headers = {"Authorization": f"Bearer {cfg.api_key}"}
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=300) as client:
        users = [SimUser(i, cfg, client, report, started) for i in range(cfg.users)]
        await asyncio.gather(*(u.run(deadline, budget) for u in users))
    report.summarise()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_json(), indent=2))
    return report
