"""Hot-swap under load: while streaming clients (SSE and WebSocket) keep the server busy, new
policy versions are published and activated again and again — by the admin API, by a direct
activation in the ``policies`` table that the server's poller picks up (what the trainer
does), and by rollbacks. No request may be dropped, and no response may mix versions.

How a mixed or mislabelled response would be caught: every published version has its own
random weights, chosen so that its greedy answer to each test prompt differs from every other
version's, and so that every greedy step is decisive (the best token leads the second by far
more than batching noise). Clients ask greedily, so the text alone proves which weights wrote
it: each response must equal, exactly, what the version it names (``system_fingerprint`` on
every SSE chunk, ``policy_version`` in the WebSocket ``done`` frame, ``policy_version`` in the
log) produces for that prompt on its own, in an engine of its own. A response that switched
weights mid-stream, or names the wrong version, does not.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from server.api.app import create_app
from server.engine import EngineConfig, LLMEngine, SamplingParams
from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.keys import create_key
from shared.model import PaLM, PaLMConfig
from shared.policies import activate
from shared.tokenizer import Tokenizer, apply_chat_template
from tests.conftest import LiveServer
from tests.reliability._streams import (
    chat_body,
    check_logged_once,
    scrape,
    stream_until,
)

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is 2 + 3?",
    "Sort these numbers: 5, 3, 9.",
    "Say hello to my friend.",
    "Name a colour of the sky.",
]
MAX_TOKENS = 8
# Every greedy step of a staged version leads the runner-up by at least this (log-prob).
# Batch composition moves log-probs by about 1e-6 on this model, so 1e-3 cannot flip a token.
MIN_GAP = 1e-3
CLIENTS = 32  # half SSE, half WebSocket
SWAP_EVERY_S = 1.5
STAGED = 10
WEIGHTS = "model.safetensors"
HOWS = ("admin_api", "table", "rollback")


@dataclass
class Staged:
    """A policy version with its own random weights, not yet in the server's registry."""

    path: Path
    sha256: str
    answers: dict[str, str]  # prompt -> its greedy answer, computed alone


def _greedy_alone(registry: PolicyRegistry, version: str, tok: Tokenizer):
    """Each prompt's greedy answer by ``version`` in an engine of its own, one request at a
    time; and the smallest lead of the chosen token over the runner-up at any step. (One
    torch thread: on a busy 2-core machine two threads make this tiny model ~20x slower.)"""
    config = EngineConfig(kv_cache_memory_mb=2, num_threads=1)
    engine = LLMEngine.from_registry(registry, version, config)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=2)
    answers, gap = {}, float("inf")
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = apply_chat_template(tok, messages, add_generation_prompt=True)
        (delta,) = engine.generate([ids], params)[0]
        answers[prompt] = delta.text
        if delta.finish_reason.value != "length":
            gap = 0.0  # an end token was chosen: its lead is not reported, so refuse it
        gap = min([gap, *(lp.top[0][1] - lp.top[1][1] for lp in delta.logprobs)])
    return answers, gap


@pytest.fixture(scope="module")
def staged_versions(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    """STAGED versions, every one decisive at every greedy step and answering every prompt
    differently from all the others (candidates that are not are skipped)."""
    tok = PolicyRegistry(tiny_seed_dir.parent).load(tiny_seed_dir.name).tokenizer
    staging = PolicyRegistry(tmp_path_factory.mktemp("staged-policies"))
    accepted: list[Staged] = []
    threads = torch.get_num_threads()  # the staging engines use one; the server sets its own
    with torch.random.fork_rng():
        for seed in itertools.count(1000):
            assert seed < 1000 + 10 * STAGED, "too few decisive, distinct random versions"
            torch.manual_seed(seed)
            model = PaLM(PaLMConfig.from_name("tiny", num_tokens=tok.vocab_size, max_seq_len=256))
            version = staging.publish(model, tok)
            answers, gap = _greedy_alone(staging, version, tok)
            if gap < MIN_GAP or any(s.answers[p] == answers[p] for s in accepted for p in PROMPTS):
                continue
            sha = staging.manifest(version)["files"][WEIGHTS]["sha256"]
            accepted.append(Staged(staging.path(version), sha, answers))
            if len(accepted) == STAGED:
                torch.set_num_threads(threads)
                return accepted


def _greedy_chat(i: int, n: int, rng: random.Random) -> dict:
    """A greedy chat: its text alone tells which version wrote it."""
    return chat_body(rng.choice(PROMPTS), max_tokens=MAX_TOKENS, temperature=0)


async def _swap_repeatedly(live, admin: httpx.AsyncClient, staged: list[Staged], until: float):
    """Publish and activate versions until ``until``, in turn: a new version through the admin
    API, a new version activated directly in the table (as the trainer does; the server's
    poller picks it up), a rollback. Returns [(time the server served it, version, how)]."""
    state = live.state
    engine = state.engine
    registry = state.registry
    swaps = []
    fresh = iter(staged)
    for i in itertools.count():
        await asyncio.sleep(SWAP_EVERY_S)
        if time.monotonic() >= until:
            return swaps
        how = HOWS[i % len(HOWS)]
        if how == "rollback":
            r = await admin.post("/v1/policies/rollback")
            assert r.status_code == 200, r.text
            version = r.json()["active"]
        else:
            candidate = next(fresh, None)
            if candidate is None:
                return swaps
            version = await asyncio.to_thread(registry.install, candidate.path)
            live.answers[version] = candidate
            if how == "admin_api":
                r = await admin.post(f"/v1/policies/{version}/activate")
                assert r.status_code == 200, r.text
            else:
                await asyncio.to_thread(activate, state.db, registry, version)
        async with asyncio.timeout(30):  # the admin API swaps before answering; the poller soon
            while engine.version != version:
                await asyncio.sleep(0.005)
        swaps.append((time.monotonic(), version, how))


@pytest.mark.parametrize(
    ("database", "duration_s"),
    [("sqlite", 20.0), pytest.param("postgres", 10.0, marks=pytest.mark.postgres)],
)
async def test_hot_swaps_under_load_drop_nothing_and_never_mix_versions(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_seed_dir: Path,
    staged_versions: list[Staged],
    reliability_report,
    database: str,
    duration_s: float,
) -> None:
    url = "" if database == "sqlite" else request.getfixturevalue("postgres_url")
    # flag: every check still runs on every stream, but the staged random-weight versions'
    # greedy noise is outside what the moderation classifier judges, so none is cut off
    settings = Settings(
        data_dir=tmp_path,
        database_url=url,
        kv_cache_memory_mb=8,
        policy_poll_seconds=0.2,
        moderation_mode="flag",
    )
    app = create_app(settings, seed_dir=tiny_seed_dir)
    state = app.state.palmchat
    with LiveServer(app) as live:
        live.state, live.answers = state, {}
        engine = state.engine
        keys = [create_key(state.db, f"swap-{i}") for i in range(CLIENTS)]
        admin_key = create_key(state.db, "root", admin=True)
        async with httpx.AsyncClient(
            base_url=live.url, timeout=60, headers={"Authorization": f"Bearer {admin_key}"}
        ) as admin:
            # start on a staged version: every version that can serve has a known answer
            first = state.registry.install(staged_versions[0].path)
            live.answers[first] = staged_versions[0]
            assert (await admin.post(f"/v1/policies/{first}/activate")).status_code == 200
            assert engine.version == first
            before = scrape(live.url)
            started = time.monotonic()
            until = started + duration_s
            results, swaps = await asyncio.gather(
                stream_until(live.url, keys, until, _greedy_chat),
                _swap_repeatedly(live, admin, staged_versions[1:], until),
            )
            elapsed = time.monotonic() - started
            async with asyncio.timeout(30):
                while engine.stats().running or len(engine.stats().policy_versions) > 1:
                    await asyncio.sleep(0.01)
            stats = engine.stats()
            after = scrape(live.url)
            # swaps with no traffic at all: the replaced version is unloaded at once, not kept
            # (with its KV pool) until some later request makes the engine step
            idle_leftovers = []
            for change in ("/v1/policies/rollback", f"/v1/policies/{engine.version}/activate"):
                assert (await admin.post(change)).status_code == 200
                swapped = engine.stats()
                async with asyncio.timeout(10):  # a snapshot surely taken after the swap
                    while engine.stats() is swapped:
                        await asyncio.sleep(0.005)
                idle_leftovers.append(len(engine.stats().policy_versions) - 1)
        weights = {v: state.registry.manifest(v)["files"][WEIGHTS]["sha256"] for v in live.answers}

    ok = [r for r in results if r.status == "ok"]
    errors = [f"{r.transport}: {r.detail}" for r in results if r.status != "ok"]
    # every part of a response names one version, and the text is that version's own answer
    mixed = [r for r in ok if len(set(r.versions)) != 1]
    wrong = [
        f"{r.transport} {r.version} {r.prompt!r}: {r.text!r}"
        for r in ok
        if r.version not in live.answers or live.answers[r.version].answers[r.prompt] != r.text
    ]
    log_problems = check_logged_once(results, state.db)
    served = {r.version for r in ok}
    in_flight = [r for r in ok if any(r.started_at < t < r.finished_at for t, _, _ in swaps)]
    timeline = [(started, first), *((t, v) for t, v, _ in swaps)]

    def active_at(t: float) -> str:
        return [v for at, v in timeline if at <= t][-1]

    old_version_finishes = [r for r in in_flight if r.version != active_at(r.finished_at)]
    swap_metric = after["palmchat_policy_swaps_total"] - before["palmchat_policy_swaps_total"]
    reliability_report.record(
        "hot_swap" if database == "sqlite" else "hot_swap_postgres",
        database=database,
        clients=CLIENTS,
        duration_s=round(elapsed, 2),
        requests=len(results),
        errors=len(errors),
        swaps=len(swaps),
        swaps_by={h: sum(1 for *_, how in swaps if how == h) for h in HOWS},
        versions_published=len(live.answers),
        versions_served=len(served),
        responses_in_flight_across_a_swap=len(in_flight),
        responses_finished_on_the_replaced_version=len(old_version_finishes),
        mixed_version_responses=len(mixed),
        responses_not_matching_their_version=len(wrong),
        log_problems=len(log_problems),
        versions_kept_after_idle_swaps=max(idle_leftovers),
        items_lost=len(errors) + len(log_problems),
    )
    # the installed copies carry the staged weights the answers were computed with
    assert all(weights[v] == live.answers[v].sha256 for v in live.answers)
    assert not errors, errors[:5]
    assert not mixed, [(r.transport, r.versions) for r in mixed[:5]]
    assert not wrong, wrong[:5]
    assert not log_problems, log_problems[:5]
    assert {how for *_, how in swaps} == set(HOWS)  # each way at least once
    assert swap_metric == len(swaps)
    assert len(served) >= 3 and in_flight  # the swaps really happened under traffic
    # the replaced versions drained and were unloaded; nothing holds a KV block
    assert len(stats.policy_versions) == 1 and stats.kv_blocks_used == 0
    assert idle_leftovers == [0, 0]
