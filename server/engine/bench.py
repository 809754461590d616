"""``palmchat bench engine``: this engine against one-at-a-time serving, PaLM-rlhf-pytorch's own
``generate`` and HF transformers' Llama ``generate``, on the same weights / size and prompts.

    python -m server.engine.bench --new-tokens 256     # writes ops/bench/results/engine-*.json

Every number is wall-clock tokens/s of generated tokens (prompt tokens excluded), after one
warm-up, greedy, with the end token ignored so every request makes exactly ``new_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling import SamplingParams
from shared.checkpoints import Policy, PolicyRegistry
from shared.model import PaLM, PaLMConfig
from shared.tokenizer import ByteTokenizer

RESULTS_DIR = Path("ops/bench/results")


def bench_policy(preset: str = "small", depth: int = 4, vocab: int = 2048, seed: int = 0) -> Policy:
    """Random weights of the seed policy's shape (the benchmark measures speed, not text)."""
    torch.manual_seed(seed)
    model = PaLM(PaLMConfig.from_name(preset, depth=depth, num_tokens=vocab)).eval()
    return Policy("bench", model, ByteTokenizer(max(vocab, 261)), {})


def bench_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randrange(16, 49))] for _ in range(count)]


def _timed(fn: Callable[[], int]) -> dict[str, float]:
    start = time.perf_counter()
    tokens = fn()
    seconds = time.perf_counter() - start
    return {
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
    }


ENGINE_CONFIG: dict[str, Any] = {"max_num_seqs": 64, "max_batched_tokens": 8192}


def _engine(policy: Policy, **overrides: Any) -> LLMEngine:
    return LLMEngine(policy, EngineConfig(**{**ENGINE_CONFIG, **overrides}))


def engine_sync(engine: LLMEngine, prompts: list[list[int]], new_tokens: int) -> int:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return sum(len(c.token_ids) for r in engine.generate(prompts, params) for c in r)


def engine_async(front: AsyncEngine, prompts: list[list[int]], new_tokens: int) -> int:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    async def one(prompt: list[int]) -> int:
        return sum([len(d.token_ids) async for d in front.generate(prompt, params)])

    async def all_of() -> int:
        return sum(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(all_of())


def palm_rlhf_generate(model: PaLM, prompts: list[list[int]], new_tokens: int) -> int:
    from palm_rlhf_pytorch import PaLM as RefPaLM

    c = model.config
    ref = RefPaLM(
        num_tokens=c.num_tokens,
        dim=c.dim,
        depth=c.depth,
        heads=c.heads,
        dim_head=c.dim_head,
        ff_mult=c.ff_mult,
        rotary_xpos_scale_base=c.xpos_scale_base,
    ).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    total = 0
    for p in prompts:  # batch 1: its generate takes one (unpadded) prompt length
        prompt = torch.tensor([p])
        out = ref.generate(len(p) + new_tokens, prompt, temperature=1.0, filter_thres=0.9)
        total += out.shape[-1]
    return total


def hf_llama(config: PaLMConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=config.num_tokens,
        hidden_size=config.dim,
        intermediate_size=config.ff_inner_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.heads,
        num_key_value_heads=1,
        head_dim=config.dim_head,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(llama).eval()


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> int:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as HF decoder-only generation expects
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return (out.shape[1] - width) * len(prompts)


def prefix_cache_cost(
    policy: Policy, prompt_len: int = 500, n: int = 4, **engine_overrides: Any
) -> dict[str, float]:
    """Time to the first token of every candidate: n candidates vs one, fresh engine each."""
    prompt = bench_prompts(1, policy.config.num_tokens, seed=99)[0]
    prompt = (prompt * (prompt_len // len(prompt) + 1))[:prompt_len]

    def first_tokens(count: int) -> float:
        engine = _engine(policy, **engine_overrides)
        engine.generate([prompt[:32]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        params = SamplingParams(temperature=1.0, n=count, max_tokens=1, seed=0)
        start = time.perf_counter()
        engine.generate([prompt], params)
        return time.perf_counter() - start

    one = min(first_tokens(1) for _ in range(3))
    many = min(first_tokens(n) for _ in range(3))
    return {
        "prompt_tokens": prompt_len,
        "n": n,
        "one_candidate_s": round(one, 4),
        f"n{n}_candidates_s": round(many, 4),
        "ratio": round(many / one, 3),
    }


def run_engine_benchmark(
    new_tokens: int = 256,
    concurrency: tuple[int, ...] = (1, 8, 32, 64),
    hf_batches: tuple[int, ...] = (1, 8, 32),
    sequential_requests: int = 4,
    reference_requests: int = 1,
    policy: Policy | None = None,
    include_hf: bool = True,
    include_reference: bool = True,
    out_dir: Path | None = RESULTS_DIR,
    engine_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every measurement in one process and return (and write) the results.

    ``engine_overrides`` are ``EngineConfig`` fields (e.g. ``kv_cache_memory_mb``)."""
    overrides = engine_overrides or {}
    policy = policy or bench_policy()
    config = policy.config
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    prompts = bench_prompts(max(concurrency), config.num_tokens)
    results: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_threads": threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device": "cpu",
        },
        "model": {**config.to_dict(), "params": policy.model.num_params()},
        "new_tokens": new_tokens,
    }
    engine = _engine(policy, **overrides)
    engine_sync(engine, prompts[:2], 8)  # warm-up
    results["engine"] = {
        str(c): _timed(lambda c=c: engine_sync(engine, prompts[:c], new_tokens))
        for c in concurrency
    }
    front = AsyncEngine(_engine(policy, **overrides))
    try:
        engine_async(front, prompts[:2], 8)
        results["engine_async"] = {
            str(c): _timed(lambda c=c: engine_async(front, prompts[:c], new_tokens))
            for c in concurrency
        }
    finally:
        front.shutdown()
    seq = prompts[:sequential_requests]
    results["one_at_a_time"] = _timed(
        lambda: sum(engine_sync(engine, [p], new_tokens) for p in seq)
    )
    if include_reference:
        ref = prompts[:reference_requests]
        results["palm_rlhf_pytorch"] = {
            "1": _timed(lambda: palm_rlhf_generate(policy.model, ref, new_tokens))
        }
    if include_hf:
        llama = hf_llama(config)
        hf_generate(llama, prompts[:2], 4)
        results["hf_llama"] = {
            "params": sum(p.numel() for p in llama.parameters()),
            **{
                str(b): _timed(lambda b=b: hf_generate(llama, prompts[:b], new_tokens))
                for b in hf_batches
            },
        }
    results["prefix_cache"] = prefix_cache_cost(policy, **overrides)
    results["targets"] = _targets(results)
    if out_dir is not None:
        write_results(results, out_dir)
    return results


def _targets(r: dict[str, Any]) -> dict[str, Any]:
    def tps(section: str, key: str) -> float | None:
        value = r.get(section, {}).get(key)
        return value["tokens_per_s"] if isinstance(value, dict) else None

    out: dict[str, Any] = {}
    for name in ("engine", "engine_async"):
        b1, b32 = tps(name, "1"), tps(name, "32")
        seq = r["one_at_a_time"]["tokens_per_s"]
        checks = {"batch32_vs_one_at_a_time": (b32 / seq if b32 else None, 12.0)}
        if (hf1 := tps("hf_llama", "1")) and b1:
            checks["batch1_vs_hf"] = (b1 / hf1, 1.5)
        if (hf32 := tps("hf_llama", "32")) and b32:
            checks["batch32_vs_hf"] = (b32 / hf32, 1.5)
        if (ref := tps("palm_rlhf_pytorch", "1")) and b1:
            checks["batch1_vs_palm_rlhf_pytorch"] = (b1 / ref, 6.0)
        out[name] = {
            k: {"ratio": round(v, 2), "target": t, "met": v >= t}
            for k, (v, t) in checks.items()
            if v is not None
        }
    ratio = r["prefix_cache"]["ratio"]
    out["prefix_cache_n4_vs_1"] = {"ratio": ratio, "target": "< 1.5", "met": ratio < 1.5}
    return out


def markdown_table(r: dict[str, Any]) -> str:
    """The README table: generated tokens/s by concurrency for every contender."""

    def cell(section: str, key: str) -> str:
        value = r.get(section, {}).get(key)
        return f"{value['tokens_per_s']:,.0f}" if isinstance(value, dict) else "-"

    keys = sorted({k for s in ("engine", "hf_llama") for k in r.get(s, {}) if k.isdigit()}, key=int)
    rows = [
        ("palmchat engine (continuous batching)", "engine"),
        ("palmchat engine via AsyncEngine streams", "engine_async"),
        ("HF transformers Llama `generate` (same size, random weights)", "hf_llama"),
        ("PaLM-rlhf-pytorch `generate` (same weights, no KV cache)", "palm_rlhf_pytorch"),
    ]
    lines = [
        "| generated tokens/s | " + " | ".join(f"{k} concurrent" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for label, section in rows:
        if section in r:
            lines.append(f"| {label} | " + " | ".join(cell(section, k) for k in keys) + " |")
    one = r["one_at_a_time"]["tokens_per_s"]
    lines.append(
        f"| palmchat engine, one request at a time | {one:,.0f} |" + " |" * (len(keys) - 1)
    )
    return "\n".join(lines)


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["created_at"].replace(":", "").replace("+0000", "")
    path = out_dir / f"engine-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "engine-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    with contextlib.suppress(ImportError):  # matplotlib is optional
        _plot(results, out_dir / "engine-latest.png")
    return path


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (
        ("engine", "palmchat engine"),
        ("engine_async", "engine (async front)"),
        ("hf_llama", "HF transformers Llama"),
    ):
        points = sorted(
            (int(k), v["tokens_per_s"]) for k, v in r.get(name, {}).items() if isinstance(v, dict)
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    for name, label in (("one_at_a_time", "engine, one at a time"),):
        ax.axhline(r[name]["tokens_per_s"], ls="--", color="gray", label=label)
    if "palm_rlhf_pytorch" in r:
        ax.axhline(
            r["palm_rlhf_pytorch"]["1"]["tokens_per_s"],
            ls=":",
            color="red",
            label="PaLM-rlhf-pytorch generate (batch 1)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (batch)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(
        f"{r['model']['params'] / 1e6:.1f}M params, {r['new_tokens']} new tokens, "
        f"{r['machine']['cpu_threads']} CPU threads"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--registry", type=Path, help="use this registry's policy weights")
    parser.add_argument("--version", help="policy version (default: latest)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    policy = None
    if args.registry:
        registry = PolicyRegistry(args.registry)
        policy = registry.load(args.version or registry.latest())
    results = run_engine_benchmark(
        new_tokens=args.new_tokens,
        concurrency=tuple(args.concurrency),
        policy=policy,
        include_hf=not args.no_hf,
        include_reference=not args.no_reference,
        out_dir=args.out,
    )
    print(
        json.dumps(
            {
                k: results[k]
                for k in (
                    "engine",
                    "engine_async",
                    "one_at_a_time",
                    "palm_rlhf_pytorch",
                    "hf_llama",
                    "prefix_cache",
                    "targets",
                )
                if k in results
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
