"""``palmchat bench api``: concurrent SSE streams through uvicorn vs the engine alone, one run.

Same random-weight policy (the seed's shape), same prompts, greedy, ``ignore_eos`` so every
stream makes exactly ``new_tokens``. Reports generated tokens/s for both, their ratio, and
time-to-first-token p50/p95 as seen by the HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.engine import RESULTS_DIR, bench_policy, bench_prompts
from server.engine import AsyncEngine, EngineConfig, LLMEngine, SamplingParams
from shared.checkpoints import PolicyRegistry
from shared.config import Settings


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _summary(tokens: int, seconds: float, ttfts: list[float]) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "ttft_p50_s": round(_pct(ttfts, 0.5), 4),
        "ttft_p95_s": round(_pct(ttfts, 0.95), 4),
    }


async def _engine_alone(
    front: AsyncEngine, prompts: list[list[int]], new_tokens: int
) -> dict[str, Any]:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ttfts: list[float] = []

    async def one(prompt: list[int]) -> int:
        start, n = time.perf_counter(), 0
        async for delta in front.generate(prompt, params):
            if n == 0 and delta.token_ids:
                ttfts.append(time.perf_counter() - start)
            n += len(delta.token_ids)
        return n

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    seconds = time.perf_counter() - start
    return _summary(tokens, seconds, ttfts)


async def _through_api(url: str, key: str, texts: list[str], new_tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}

    async def one(client: httpx.AsyncClient, text: str) -> int:
        body = {
            "model": "palmchat",
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            "temperature": 0,
            "max_tokens": new_tokens,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        start, first, tokens = time.perf_counter(), True, 0
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first and chunk["choices"]:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens

    limits = httpx.Limits(max_connections=len(texts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(client, t) for t in texts)))
        seconds = time.perf_counter() - start
    return _summary(tokens, seconds, ttfts)


def _run_leg(leg: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
    return asyncio.run(leg(*args))


class Client:
    """Runs the HTTP client's legs, in a process of its own by default: a deployment's clients
    are elsewhere, and one sharing the server's interpreter would be billed to the gateway."""

    def __init__(self, own_process: bool = True) -> None:
        self.own_process = own_process
        self._pool = (
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            if own_process
            else None
        )

    def run(self, leg: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        if self._pool is None:
            return _run_leg(leg, *args)
        return self._pool.submit(_run_leg, leg, *args).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


SHORT_TOKENS = (5, 30)  # a short chat's answer length: what chat users mostly get
MODERATION_TOKENS = 32  # tokens per stream in the moderation on/off rounds


def chat_texts(count: int, seed: int = 0) -> list[str]:
    """What chat users ask (the demo's benign tasks), so the moderation classifier judges real
    words rather than the bench's random letters; none is blocked, so both legs generate
    the same work."""
    from demo.tasks import FAMILIES, SAFETY_FAMILIES, TaskGenerator

    benign = [f for f in FAMILIES if f not in SAFETY_FAMILIES]
    tasks = TaskGenerator(seed, benign).iter_tasks(count, split=None)
    return [t.messages[-1]["content"] for t in tasks]


def short_lengths(count: int, seed: int = 0) -> list[int]:
    """Answer lengths of ``count`` short chats, 5-30 tokens, the same in every leg."""
    import random

    rng = random.Random(seed)
    return [rng.randint(*SHORT_TOKENS) for _ in range(count)]


async def _short_engine(
    front: AsyncEngine, prompts: list[list[int]], lengths: list[int]
) -> dict[str, Any]:
    async def one(prompt: list[int], n: int) -> int:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return sum([len(d.token_ids) async for d in front.generate(prompt, params)])

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths, strict=True))))
    return _requests_summary(len(prompts), tokens, time.perf_counter() - start, [])


def _requests_summary(
    requests: int, tokens: int, seconds: float, latencies: list[float]
) -> dict[str, Any]:
    return {
        "requests": requests,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "requests_per_s": round(requests / seconds, 2),
        "latency_p50_s": round(_pct(latencies, 0.5), 4) if latencies else None,
        "latency_p95_s": round(_pct(latencies, 0.95), 4) if latencies else None,
    }


async def _short_api(
    url: str, key: str, texts: list[str], lengths: list[int], concurrent: bool
) -> dict[str, Any]:
    """Non-streaming chat completions through the API, all at once or one after another."""
    headers = {"Authorization": f"Bearer {key}"}
    latencies: list[float] = []

    async def one(client: httpx.AsyncClient, text: str, n: int) -> int:
        body = {
            "model": "palmchat",
            "messages": [{"role": "user", "content": text}],
            "temperature": 0,
            "max_tokens": n,
            "ignore_eos": True,
        }
        start = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=body, headers=headers)
        r.raise_for_status()
        latencies.append(time.perf_counter() - start)
        return int(r.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=len(texts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        pairs = list(zip(texts, lengths, strict=True))
        if concurrent:
            tokens = sum(await asyncio.gather(*(one(client, t, n) for t, n in pairs)))
        else:
            tokens = 0
            for t, n in pairs:
                tokens += await one(client, t, n)
        seconds = time.perf_counter() - start
    return _requests_summary(len(texts), tokens, seconds, latencies)


def run_stream_rounds(
    front: AsyncEngine,
    servers: dict[str, tuple[str, str]],
    texts: list[str],
    prompts: list[list[int]],
    new_tokens: int,
    rounds: int,
    client: Client,
) -> dict[str, Any]:
    """``rounds`` interleaved rounds of the long streams: the engine alone, then through each
    of ``servers`` (leg name: (URL, key)). Each leg is reported as its median round (by
    tokens/s), with every round's tokens/s; ``api_vs_engine`` and ``api_process_vs_engine``
    are ratios of the medians."""
    import statistics

    runs: dict[str, list[dict[str, Any]]] = {"engine_alone": []}
    for _ in range(rounds):
        runs["engine_alone"].append(asyncio.run(_engine_alone(front, prompts, new_tokens)))
        for leg, (url, key) in servers.items():
            runs.setdefault(leg, []).append(client.run(_through_api, url, key, texts, new_tokens))
    out: dict[str, Any] = {"stream_rounds": rounds}
    for leg, legs in runs.items():
        ranked = sorted(legs, key=lambda r: r["tokens_per_s"])
        out[leg] = ranked[(len(ranked) - 1) // 2] | {
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in legs]
        }
    median = {leg: statistics.median(r["tokens_per_s"] for r in legs) for leg, legs in runs.items()}
    for leg in servers:
        name = leg.replace("through_", "")
        out[f"{name}_vs_engine"] = round(median[leg] / median["engine_alone"], 3)
    return out


def run_short_chat_rounds(
    front: AsyncEngine,
    url: str,
    key: str,
    texts: list[str],
    prompts: list[list[int]],
    rounds: int,
    client: Client,
    process: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Short chats (5-30 token answers), ``rounds`` interleaved rounds of: the engine alone,
    all through the API at once, and the API one at a time; with ``process`` (the URL and
    key of a second server whose engine core runs in its own process) the same two API legs
    through it. Medians of requests/s."""
    import statistics

    lengths = short_lengths(len(texts))
    servers = {"api": (url, key)}
    if process is not None:
        servers["api_process"] = process
    legs: dict[str, list[dict[str, Any]]] = {"engine": []}
    for _ in range(rounds):
        legs["engine"].append(asyncio.run(_short_engine(front, prompts, lengths)))
        for name, (at, with_key) in servers.items():
            for concurrent, leg in ((True, name), (False, f"{name}_sequential")):
                run = client.run(_short_api, at, with_key, texts, lengths, concurrent)
                legs.setdefault(leg, []).append(run)
    median = {k: statistics.median(r["requests_per_s"] for r in v) for k, v in legs.items()}
    out = {
        "requests": len(texts),
        "answer_tokens": list(SHORT_TOKENS),
        "rounds": rounds,
        "requests_per_s_median": {k: round(v, 2) for k, v in median.items()},
        "runs": legs,
    }
    for name in servers:
        prefix = "api" if name == "api" else name
        out[f"{prefix}_vs_engine"] = round(median[name] / median["engine"], 3)
        out[f"{prefix}_concurrent_vs_sequential"] = round(
            median[name] / median[f"{name}_sequential"], 2
        )
    return out


def run_moderation_rounds(
    hook: Any, url: str, key: str, texts: list[str], rounds: int, client: Client
) -> dict[str, Any]:
    """TTFT of concurrent streamed chats with moderation in ``block`` mode (the default: the
    input checked before generation, the first delta held until its check) against ``off``,
    ``rounds`` interleaved rounds on the same server; medians of each round's median TTFT."""
    import statistics

    legs: dict[str, list[dict[str, Any]]] = {"block": [], "off": []}
    mode = hook.mode
    try:
        for _ in range(rounds):
            for leg in legs:
                hook.mode = leg
                legs[leg].append(client.run(_through_api, url, key, texts, MODERATION_TOKENS))
    finally:
        hook.mode = mode
    ttft = {k: 1000 * statistics.median(r["ttft_p50_s"] for r in v) for k, v in legs.items()}
    return {
        "streams": len(texts),
        "new_tokens": MODERATION_TOKENS,
        "rounds": rounds,
        "classifier": hook.moderator.version if hook.moderator is not None else None,
        "ttft_p50_ms_median": {k: round(v, 2) for k, v in ttft.items()},
        "runs": legs,
        "ttft_block_vs_off": round(ttft["block"] / ttft["off"], 3),
    }


def run_api_benchmark(
    streams: int = 32,
    new_tokens: int = 128,
    out_dir: Path | None = RESULTS_DIR,
    backend: str = "engine",
    short_rounds: int = 5,
    client_process: bool = True,
    moderation_rounds: int = 5,
    stream_rounds: int = 5,
) -> dict[str, Any]:
    """``stream_rounds`` interleaved rounds of: the engine alone, the same requests as SSE
    streams through uvicorn, and through a gateway whose engine core runs in a process of
    its own (:func:`run_stream_rounds`); returns results. Then ``short_rounds`` interleaved
    rounds of short chats (:func:`run_short_chat_rounds`) and ``moderation_rounds`` of
    moderation on vs off (:func:`run_moderation_rounds`).

    ``backend="triton"`` adds a third leg in the same run: the same streams through a gateway
    whose backend is a real tritonserver on loopback (the engine inside Triton's Python
    backend, reached over gRPC streaming), and ``triton_vs_in_process``. The HTTP client runs in
    a process of its own unless ``client_process`` is False.
    """
    if backend not in ("engine", "triton"):
        raise ValueError(f"backend must be engine or triton, got {backend!r}")
    from server.api.app import create_app
    from server.api.live import LiveServer
    from shared.keys import create_key
    from shared.tokenizer import apply_chat_template

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    policy = bench_policy()
    vocab = policy.config.num_tokens
    # printable prompts of 16-48 bytes (the bench tokenizer is byte-level)
    texts = ["".join(chr(97 + t % 26) for t in ids) for ids in bench_prompts(streams, vocab)]
    prompts = [
        apply_chat_template(policy.tokenizer, [{"role": "user", "content": t}]) for t in texts
    ]
    results: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_threads": threads, "torch": torch.__version__},
        "model": {**policy.config.to_dict(), "params": policy.model.num_params()},
        "streams": streams,
        "new_tokens": new_tokens,
        "client": "own process" if client_process else "the server's process",
    }
    config = EngineConfig(max_num_seqs=64, max_batched_tokens=8192)
    with tempfile.TemporaryDirectory() as tmp:
        registry = PolicyRegistry(Path(tmp) / "seed")
        seed = registry.path(registry.publish(policy.model, policy.tokenizer))
        settings = Settings(
            data_dir=Path(tmp) / "data", rate_limit_per_minute=0, log_level="WARNING"
        )
        # on the same version the server's database makes active, so it never tries a swap;
        # the engine-alone legs drive this engine too (idle between legs)
        served = AsyncEngine(LLMEngine.from_registry(registry, "v1", config))
        app = create_app(settings, seed_dir=seed, engine=served)
        client = Client(client_process)
        try:
            # a second server, its engine core in a process of its own, idles while the
            # first is measured, and the other way round
            with LiveServer(app) as live, _process_server(Path(tmp), seed) as process:
                key = create_key(app.state.palmchat.db, "bench")
                servers = {"through_api": (live.url, key), "through_api_process": process}
                asyncio.run(_engine_alone(served, prompts[:2], 4))  # warm-up
                for url, with_key in servers.values():
                    client.run(_through_api, url, with_key, texts[:2], 4)
                results |= run_stream_rounds(
                    served, servers, texts, prompts, new_tokens, stream_rounds, client
                )
                if short_rounds:
                    # the engine-alone leg drives the server's own engine (idle between legs)
                    results["short_chats"] = run_short_chat_rounds(
                        served, live.url, key, texts, prompts, short_rounds, client, process
                    )
                if moderation_rounds:
                    results["moderation"] = run_moderation_rounds(
                        app.state.palmchat.moderation, live.url, key,
                        chat_texts(streams), moderation_rounds, client,
                    )  # fmt: skip
            if backend == "triton":
                results["through_api_triton"] = _through_triton(
                    Path(tmp), seed, config, texts, new_tokens, client
                )
        finally:
            served.shutdown()
            client.close()
    if backend == "triton":
        results["triton_vs_in_process"] = round(
            results["through_api_triton"]["tokens_per_s"] / results["through_api"]["tokens_per_s"],
            3,
        )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2) + "\n"
        stamp = results["created_at"].replace(":", "").replace("+0000", "")
        (out_dir / f"api-{stamp}.json").write_text(text)
        (out_dir / "api-latest.json").write_text(text)
    return results


@contextlib.contextmanager
def _process_server(tmp: Path, seed: Path) -> Iterator[tuple[str, str]]:
    """A second gateway on loopback whose engine core runs in its own process; (URL, key)."""
    from server.api.app import create_app
    from server.api.live import LiveServer
    from shared.keys import create_key

    settings = Settings(data_dir=tmp / "data-process", rate_limit_per_minute=0, log_level="WARNING")
    app = create_app(settings, seed_dir=seed, backend="process")
    with LiveServer(app) as live:
        yield live.url, create_key(app.state.palmchat.db, "bench")


def _through_triton(
    tmp: Path, seed: Path, config: EngineConfig, texts: list[str], new_tokens: int, client: Client
) -> dict[str, Any]:
    """The API leg again, the gateway's backend being a tritonserver on loopback."""
    from server.api.app import create_app
    from server.api.live import LiveServer
    from server.triton.server import TritonServer, free_port
    from shared.keys import create_key

    settings = Settings(data_dir=tmp / "data-triton", rate_limit_per_minute=0, log_level="WARNING")
    triton = TritonServer(
        settings.registry_dir,
        grpc_port=free_port(),
        http_port=free_port(),
        workdir=tmp / "triton",
        engine=config,
        log_file=tmp / "tritonserver.log",
    )
    app = create_app(settings, seed_dir=seed, backend="triton", triton_url=triton.url)
    with triton.start("v1"), LiveServer(app) as live:
        key = create_key(app.state.palmchat.db, "bench")
        client.run(_through_api, live.url, key, texts[:2], 4)  # warm-up
        result: dict[str, Any] = client.run(_through_api, live.url, key, texts, new_tokens)
        return result
