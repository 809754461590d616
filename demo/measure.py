"""Measuring a served policy through the public API: rated replies to fresh prompts, and a
probe client streaming across every swap."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, TypedDict

import httpx

from demo.rater import ScriptedRater, is_correct, politeness
from demo.tasks import SAFETY_FAMILIES, Task, TaskGenerator, is_refusal


class Figures(TypedDict):
    """A served version's rated replies, as :class:`demo.report.VersionEval` records them."""

    thumbs_up_rate: float
    correct_rate: float
    mean_score: float
    mean_chars: float
    polite_rate: float
    refused_rate: float  # replies that decline to help
    errors: int


async def evaluate_served(
    client: httpx.AsyncClient,
    prompts: list[list[dict[str, str]]],
    rater: ScriptedRater,
    *,
    max_tokens: int,
    temperature: float,
    concurrency: int = 16,
) -> tuple[str, Figures]:
    """Ask the server each prompt once (seeded per prompt, so every version gets the same
    draws of randomness) and rate the replies. Returns (version that answered, figures)."""
    gate = asyncio.Semaphore(concurrency)
    versions: set[str] = set()

    async def one(i: int, messages: list[dict[str, str]]) -> tuple[str, int] | None:
        body = {
            "model": "palmchat",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": i,
            "user": "demo-eval",
        }
        async with gate:
            try:
                r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
            except httpx.HTTPError:
                return None
        data = r.json()
        versions.add(data["system_fingerprint"])
        return data["choices"][0]["message"]["content"], i

    results = await asyncio.gather(*(one(i, m) for i, m in enumerate(prompts)))
    replies = [(prompts[r[1]], r[0]) for r in results if r is not None]
    n = max(len(replies), 1)
    figures: Figures = {
        "thumbs_up_rate": sum(rater.thumb(m, t) > 0 for m, t in replies) / n,
        "correct_rate": sum(bool(is_correct(m, t)) for m, t in replies) / n,
        "mean_score": sum(rater.rate(m, t) for m, t in replies) / n,
        "mean_chars": sum(len(t) for _, t in replies) / n,
        "polite_rate": sum(politeness(t) > 0 for _, t in replies) / n,
        "refused_rate": sum(is_refusal(t) for _, t in replies) / n,
        "errors": len(prompts) - len(replies),
    }
    version = versions.pop() if len(versions) == 1 else ",".join(sorted(versions))
    return version, figures


class Probe:
    """One client streaming (SSE) without pause: every reply must arrive whole, before, during
    and after each swap. Counts requests, failures and the versions that answered."""

    def __init__(
        self, client: httpx.AsyncClient, max_tokens: int = 24, pause: float = 0.25
    ) -> None:
        self.client, self.max_tokens, self.pause = client, max_tokens, pause
        self.requests = self.failures = 0
        self.errors: list[str] = []
        self.versions: dict[str, int] = {}
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def _one(self, i: int) -> None:
        task = TaskGenerator(10_000 + i).sample(split="train")
        body = {
            "model": "palmchat",
            "messages": task.messages,
            "max_tokens": self.max_tokens,
            "stream": True,
            "user": "demo-probe",
        }
        finish = version = None
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                version = chunk.get("system_fingerprint") or version
                for choice in chunk["choices"]:
                    finish = choice.get("finish_reason") or finish
        if finish not in ("stop", "length") or not version:
            raise RuntimeError(f"stream ended without a finish reason ({finish!r}, {version!r})")
        self.versions[version] = self.versions.get(version, 0) + 1

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.requests += 1
            try:
                await self._one(i)
            except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
                self.failures += 1
                self.errors.append(f"{type(e).__name__}: {e}")
            i += 1
            await asyncio.sleep(self.pause)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return {
            "requests": self.requests,
            "failures": self.failures,
            "errors": self.errors[:10],
            "versions": self.versions,
        }


def right_over_wrong(reward_root: Path, version: str, tasks: list[Task]) -> float | None:
    """The share of ``tasks`` (benign ones) on which reward model ``version`` scores the right
    reply above the wrong one, both written in the same polite style: whether it tells right
    from wrong apart from the users' taste. None when no task has a wrong reply."""
    from trainer.reward import RewardRegistry

    pairs = [t for t in tasks if t.family not in SAFETY_FAMILIES and "wrong" in t.replies]
    if not pairs:
        return None
    rm, tok, _ = RewardRegistry(reward_root).load(version)
    prompts = [t.messages for t in pairs]
    right = rm.score(tok, prompts, [t.replies["courteous"] for t in pairs])
    wrong = rm.score(tok, prompts, [t.replies["wrong"] for t in pairs])
    return float((right > wrong).float().mean())
