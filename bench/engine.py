"""``palmchat bench engine``: this engine against one-at-a-time serving, PaLM-rlhf-pytorch's own
``generate`` and HF transformers' Llama ``generate``, on the same weights / size and prompts.

    python -m bench.engine --new-tokens 256     # writes ops/bench/results/engine-*.json
    python -m bench.engine --device cuda        # engine-cuda-*.json

Every number is wall-clock tokens/s of generated tokens (prompt tokens excluded), after one
warm-up, greedy, with the end token ignored so every request makes exactly ``new_tokens``. On
CUDA every contender runs in bfloat16 on the GPU, and the report adds the engine without CUDA
graphs. Batch-1 decode is set against the memory-bandwidth bound measured in the same run (the
bytes a step reads over a copy's bandwidth: the GPU's HBM, or on a CPU a buffer that size).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.engine_report import markdown_table, targets, write_results
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.cpu_kernels import TUNED_MIN_TOKENS
from server.engine.llm_engine import LLMEngine
from server.engine.sampling import SamplingParams
from shared.checkpoints import Policy, PolicyRegistry
from shared.families import PolicyModel
from shared.model import PaLM, PaLMConfig
from shared.tokenizer import ByteTokenizer

RESULTS_DIR = Path("ops/bench/results")


def check_device(device: str | None) -> str:
    """The device a benchmark runs on (default: cuda when PyTorch sees a GPU, else cpu); a
    ValueError names what is wrong with one it cannot use."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith(("cpu", "cuda")):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine's PyTorch sees no CUDA GPU")
    return device


def bench_policy(preset: str = "small", depth: int = 4, vocab: int = 2048, seed: int = 0) -> Policy:
    """Random weights of the seed policy's shape (the benchmark measures speed, not text)."""
    torch.manual_seed(seed)
    model = PaLM(PaLMConfig.from_name(preset, depth=depth, num_tokens=vocab)).eval()
    return Policy("bench", model, ByteTokenizer(max(vocab, 261)), {})


def bench_prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randrange(16, 49))] for _ in range(count)]


def _timed_rounds(
    fns: dict[str, Callable[[], int]], repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, dict[str, Any]]:
    """Run every measurement once per round, ``repeats`` rounds, interleaved (round 1 of each,
    then round 2 of each, ...): a slow spell of a shared machine then hits every contender
    alike instead of whichever ran during it. Each reports its fastest run, its median and
    every run."""
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            tokens = fn()
            sync()  # a GPU contender's last kernels count too
            runs[name].append((time.perf_counter() - start, tokens))
    out = {}
    for name, timed in runs.items():
        seconds, tokens = min(timed)
        out[name] = {
            "tokens": tokens,
            "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "median_tokens_per_s": round(statistics.median(t / s for s, t in timed), 1),
            "runs_tokens_per_s": [round(t / s, 1) for s, t in timed],
        }
    return out


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


# the PaLMConfig fields that PaLM-rlhf-pytorch's PaLM takes under the same name
REFERENCE_SHAPE = ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult")


def palm_rlhf_generate(model: PaLM, prompts: list[list[int]], new_tokens: int) -> int:
    from palm_rlhf_pytorch import PaLM as RefPaLM

    c = model.config
    shape = {name: getattr(c, name) for name in REFERENCE_SHAPE}
    ref = RefPaLM(**shape, rotary_xpos_scale_base=c.xpos_scale_base).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    ref.to(device=model.device, dtype=model.token_emb.weight.dtype)
    total = 0
    for p in prompts:  # batch 1: its generate takes one (unpadded) prompt length
        prompt = torch.tensor([p], device=model.device)
        out = ref.generate(len(p) + new_tokens, prompt, temperature=1.0, filter_thres=0.9)
        total += out.shape[-1]
    return total


def hf_llama(
    config: PaLMConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
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
    return LlamaForCausalLM(llama).eval().to(device=device, dtype=dtype)


def hf_generate(model: Any, prompts: list[list[int]], new_tokens: int) -> int:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as HF decoder-only generation expects
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
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
    repeats: int = 1,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every measurement in one process and return (and write) the results.

    ``engine_overrides`` are ``EngineConfig`` fields (e.g. ``kv_cache_memory_mb``); each
    contender runs ``repeats`` times, in rounds that interleave all of them, and reports its
    fastest run. ``threads`` (default: every core) applies to every contender. On ``device``
    "cuda" every contender runs on the GPU in the engine's dtype (bfloat16)."""
    overrides = engine_overrides or {}
    policy = policy or bench_policy()
    config = policy.config
    threads = threads or len(os.sched_getaffinity(0))  # every contender gets the same
    torch.set_num_threads(threads)
    overrides = {"num_threads": threads, "device": device, **overrides}
    cuda = torch.device(device).type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    prompts = bench_prompts(max(concurrency), config.num_tokens)
    results: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu_threads": threads,
            "cores": len(os.sched_getaffinity(0)),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            # other load on the machine skews every contender; recorded to judge a run by
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "device": device,
            **({"gpu": torch.cuda.get_device_name(device)} if cuda else {}),
        },
        "model": {**config.to_dict(), "params": policy.model.num_params()},
        "new_tokens": new_tokens,
        "repeats": repeats,
    }
    engine = _engine(policy, **overrides)
    engine_sync(engine, prompts[:2], 8)  # warm-up
    front = AsyncEngine(_engine(policy, **overrides))
    fns: dict[str, Callable[[], int]] = {}
    for c in concurrency:
        fns[f"engine/{c}"] = partial(engine_sync, engine, prompts[:c], new_tokens)
        fns[f"engine_async/{c}"] = partial(engine_async, front, prompts[:c], new_tokens)
    seq = prompts[:sequential_requests]
    fns["one_at_a_time/"] = lambda: sum(engine_sync(engine, [p], new_tokens) for p in seq)
    if include_reference and isinstance(policy.model, PaLM):  # PaLM-rlhf-pytorch runs PaLM only
        ref = prompts[:reference_requests]
        fns["palm_rlhf_pytorch/1"] = partial(palm_rlhf_generate, policy.model, ref, new_tokens)
    if cuda:  # what recording the decode steps as CUDA graphs buys
        eager = _engine(policy, **{**overrides, "cuda_graphs": False})
        engine_sync(eager, prompts[:2], 8)
        for c in (1, 32):
            fns[f"engine_eager/{c}"] = partial(engine_sync, eager, prompts[:c], new_tokens)
    if not cuda:  # what timing wide decode steps onto every core buys: the same, on one thread
        pinned = _engine(policy, **{**overrides, "decode_threads": 1})
        engine_sync(pinned, prompts[:2], 8)
        for c in (c for c in concurrency if c >= TUNED_MIN_TOKENS):
            fns[f"engine_one_thread/{c}"] = partial(engine_sync, pinned, prompts[:c], new_tokens)
    if include_hf and isinstance(config, PaLMConfig):  # a Llama of the PaLM's shape
        llama = hf_llama(config, device, policy.model.token_emb.weight.dtype)
        hf_generate(llama, prompts[:2], 4)  # warm-up
        results["hf_llama"] = {"params": sum(p.numel() for p in llama.parameters())}
        for b in hf_batches:
            fns[f"hf_llama/{b}"] = partial(hf_generate, llama, prompts[:b], new_tokens)
    try:
        engine_async(front, prompts[:2], 8)  # warm-up
        timed = _timed_rounds(fns, repeats, sync)
    finally:
        front.shutdown()
    for name, value in timed.items():
        section, key = name.split("/")
        if not key:
            results[section] = value
        else:
            results.setdefault(section, {})[key] = value
    if "engine_one_thread" in results:  # the same run's engine at 32 / 64 over the pinned one
        results["every_core_vs_one_thread"] = {
            c: round(results["engine"][c]["tokens_per_s"] / v["tokens_per_s"], 2)
            for c, v in results["engine_one_thread"].items()
            if c in results.get("engine", {})
        }
    results["prefix_cache"] = prefix_cache_cost(policy, **overrides)
    if "1" in results.get("engine", {}):
        results["roofline"] = roofline(engine, results, device)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # what the timed wide decode steps settled on, by rows (both engines share one config)
    if engine.threads is not None and front.engine.threads is not None:
        results["decode_threads"] = {
            "engine": engine.threads.timed_choices(),
            "engine_async": front.engine.threads.timed_choices(),
        }
    results["targets"] = targets(results)
    if out_dir is not None:
        write_results(results, out_dir, "engine-cuda" if cuda else "engine")
    return results


def copy_bandwidth(device: str, size_bytes: int = 2**30, repeats: int = 10) -> float:
    """Measured memory bandwidth, bytes/s: a copy of a ``size_bytes`` buffer on ``device``,
    counting the bytes read and the bytes written (the median of ``repeats`` timed copies)."""
    src = torch.randn(max(size_bytes // 4, 2**14), device=device)  # float32
    dst = torch.empty_like(src)
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(repeats + 2):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - began
        if i >= 2:  # warm-up
            times.append(seconds)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def decode_bytes(model: PolicyModel, position: int) -> int:
    """The fewest bytes one batch-1 decode step must read: every weight once (the embedding
    table only its one row) and the keys and values of the ``position`` tokens before it."""
    c = model.config
    emb = model.token_emb.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= emb.numel() * emb.element_size() - c.dim * emb.element_size()
    kv = 2 * c.depth * position * c.kv_heads * c.dim_head * emb.element_size()
    return weights + kv


def roofline(engine: LLMEngine, results: dict[str, Any], device: str) -> dict[str, Any]:
    """Batch-1 decode against the memory-bandwidth roofline: tokens/s if a step cost only the
    time to read its bytes once at the measured copy bandwidth. Reports the engine's end-to-end
    batch-1 tokens/s and the GPU time of one recorded batch-1 step (its graph replayed alone)."""
    model = engine.current.runner.model
    prompt_len = len(bench_prompts(1, model.config.num_tokens)[0])
    position = prompt_len + results["new_tokens"] // 2  # the mean position of a request
    per_token = decode_bytes(model, position)
    # a GPU's HBM through a buffer larger than its cache; on a CPU a buffer the size a step reads
    cuda = torch.device(device).type == "cuda"
    bandwidth = copy_bandwidth(device, 2**30 if cuda else per_token)
    ceiling = bandwidth / per_token
    out: dict[str, Any] = {
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "bytes_per_batch1_token": per_token,
        "roofline_tokens_per_s": round(ceiling),
    }
    graphs = engine.current.runner.graphs
    if graphs is not None:
        engine_sync(engine, [[5] * prompt_len], 4)  # records the batch-1 graph if not yet
        step_s = graphs.replay_seconds(1)
        out["graph_step_us"] = round(step_s * 1e6, 1)
        out["graph_step_pct_of_roofline"] = round(100 / step_s / ceiling, 2)
    b1 = results["engine"].get("1", {})
    if b1:
        e2e = b1.get("median_tokens_per_s", b1["tokens_per_s"])
        out["engine_batch1_tokens_per_s"] = e2e
        out["engine_batch1_pct_of_roofline"] = round(100 * e2e / ceiling, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--registry", type=Path, help="use this registry's policy weights")
    parser.add_argument("--version", help="policy version (default: latest)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, help="torch threads (default: every core)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (every contender)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds; every round runs each contender once, each reports its best and median",
    )
    args = parser.parse_args(argv)
    policy = None
    if args.registry:
        registry = PolicyRegistry(args.registry)
        version = args.version or registry.latest()
        if version is None:
            parser.error(f"no policy version in {args.registry}")
        policy = registry.load(version)
    results = run_engine_benchmark(
        new_tokens=args.new_tokens,
        concurrency=tuple(args.concurrency),
        policy=policy,
        include_hf=not args.no_hf,
        include_reference=not args.no_reference,
        out_dir=args.out,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
    )
    print(markdown_table(results))
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
                    "engine_eager",
                    "engine_one_thread",
                    "every_core_vs_one_thread",
                    "roofline",
                    "targets",
                )
                if k in results
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
