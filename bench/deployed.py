"""``palmchat bench deployed``: the GPU path at the sizes people deploy, ~1B parameters.

    python -m bench.deployed --device cuda --repeats 3   # writes ops/bench/results/deployed-*.json
    python -m bench.deployed --tiny --device cpu         # the same measurements, tiny models

Two random-weight models in bfloat16: a ~1B PaLM (preset "1b") and a ~1B Llama-family model of
Llama-3.2-1B's shape (grouped-query attention, 8 KV heads). For each, in one process:

- batch-1 decode tokens/s through the engine, as a share of the memory-bandwidth roofline
  measured in the same run (the bytes a decode step reads over the measured copy bandwidth);
- decode tokens/s at batch 1/8/32/64 through the engine and through HF transformers'
  ``generate``: the Llama with the same weights in ``LlamaForCausalLM``; PaLM, for which
  transformers has no class, against an HF Llama of its size and multi-query shape (random
  weights), as ``bench/engine.py`` does;
- prefill tokens/s of 8 fresh prompts of 512 tokens (fresh each round: no prefix-cache hits),
  through the engine and through one HF forward;

and one DPO training step with LoRA (rank 16) on the Llama: 4 pairs of 256 tokens, forward
under bfloat16 autocast, the project's ``dpo_loss``, backward, clipping and the AdamW step (the
reference log-probs precomputed, as ``train_dpo`` does). Every figure is the median of
``--repeats`` rounds that interleave all the measurements. ``--tiny`` shrinks the models, the
prompts and the pairs so that all of it runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.engine import (
    ENGINE_CONFIG,
    RESULTS_DIR,
    _timed_rounds,
    bench_prompts,
    check_device,
    engine_sync,
    hf_generate,
    hf_llama,
    roofline,
)
from bench.engine_report import write_results
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling import SamplingParams
from shared.checkpoints import Policy
from shared.families import ModelConfig, PolicyModel, build_model
from shared.llama import Llama, LlamaConfig
from shared.model import PaLMConfig
from shared.tokenizer import ByteTokenizer
from trainer.common import (
    Encoded,
    adamw,
    batched_sequence_logprobs,
    collate,
    optimizer_step,
    sequence_logprobs,
)
from trainer.config import TrainerConfig
from trainer.lora import apply_lora

BATCHES = (1, 8, 32, 64)
# the targets of issue 25, on a GPU: batch-1 decode >= 70% of the roofline, batch 64 >= 2x HF
TARGETS = {"batch1_pct_of_roofline": 70.0, "batch64_vs_hf": 2.0}


@dataclass(frozen=True, slots=True)
class Sizes:
    """What one run measures. ``max_seq_len`` is 1024 for both models: a recorded decode
    step attends over every slot a row's block table can address (server/engine/cuda_graphs.py),
    so the context the engine is built for is part of what a decode step costs."""

    palm: PaLMConfig
    llama: LlamaConfig
    new_tokens: int  # generated per request in the decode rounds
    prefill: tuple[int, int]  # prompts, tokens each
    dpo: tuple[int, int]  # preference pairs, tokens per sequence
    kv_cache_memory_mb: float


# Llama-3.2-1B's shape (its rope scaling and 128k context aside)
LLAMA_1B = LlamaConfig(
    num_tokens=32000, dim=2048, depth=16, heads=32, kv_heads=8, dim_head=64, ff_inner_dim=8192,
    norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=True, max_seq_len=1024,
)  # fmt: skip
LLAMA_TINY = LlamaConfig(
    num_tokens=512, dim=64, depth=2, heads=4, kv_heads=2, dim_head=16, ff_inner_dim=128,
    tie_embeddings=True, max_seq_len=1024,
)  # fmt: skip
SIZES = {
    "1b": Sizes(
        PaLMConfig.from_name("1b", num_tokens=32000, max_seq_len=1024), LLAMA_1B,
        new_tokens=128, prefill=(8, 512), dpo=(4, 256), kv_cache_memory_mb=2048,
    ),
    "tiny": Sizes(
        PaLMConfig.from_name("tiny", num_tokens=512, max_seq_len=1024), LLAMA_TINY,
        new_tokens=8, prefill=(8, 128), dpo=(4, 64), kv_cache_memory_mb=64,
    ),
}  # fmt: skip

# our LlamaConfig's fields under transformers' names
HF_FIELDS = {
    "vocab_size": "num_tokens",
    "hidden_size": "dim",
    "intermediate_size": "ff_inner_dim",
    "num_hidden_layers": "depth",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
    "head_dim": "dim_head",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings",
}


def random_model(config: ModelConfig, device: str, seed: int = 0) -> PolicyModel:
    """Random float32 weights, initialised on ``device`` (a 1B model's initialisation on a
    CPU would take longer than its benchmark); the engine casts its copy to bfloat16."""
    torch.manual_seed(seed)
    with torch.device(device):
        return build_model(config).eval()


def hf_twin(model: Llama, dtype: torch.dtype) -> Any:
    """transformers' ``LlamaForCausalLM`` holding ``model``'s weights, on its device."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    c = model.config
    fields = {hf: getattr(c, ours) for hf, ours in HF_FIELDS.items()}
    config = HFLlamaConfig(**fields, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(model.device):
        twin = LlamaForCausalLM(config)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval().to(dtype)


def max_logit_gap(ours: PolicyModel, hf: Any, vocab: int) -> float:
    """The largest gap between our logits and the HF contender's on one prompt: ~0 when the
    contender runs the same weights."""
    tokens = torch.tensor(bench_prompts(1, vocab, seed=7), device=ours.device)
    with torch.inference_mode():
        mine = ours(tokens).float()
        theirs = hf(input_ids=tokens).logits.float()
    return float((mine - theirs).abs().max())


def fresh_prompts(count: int, length: int, vocab: int, seeds: Iterator[int]) -> list[list[int]]:
    rng = random.Random(next(seeds))
    return [[rng.randrange(5, vocab) for _ in range(length)] for _ in range(count)]


def engine_prefill(engine: LLMEngine, prompts: Callable[[], list[list[int]]]) -> int:
    """Prompt tokens/s: new prompts every call (the prefix cache must not skip them), one
    generated token each."""
    batch = prompts()
    engine.generate(batch, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    return sum(len(p) for p in batch)


def hf_prefill(model: Any, prompts: Callable[[], list[list[int]]]) -> int:
    batch = prompts()
    with torch.inference_mode():  # the last position's logits only, as a prefill needs
        hidden = model.model(input_ids=torch.tensor(batch, device=model.device)).last_hidden_state
        model.lm_head(hidden[:, -1])
    return sum(len(p) for p in batch)


def dpo_step_fn(
    config: LlamaConfig, device: str, dtype: torch.dtype, pairs: int, length: int
) -> tuple[Callable[[], int], dict[str, Any]]:
    """One DPO/LoRA training step on a fresh copy of the Llama, ready to call: frozen base
    weights in ``dtype``, float32 LoRA adapters, forward under autocast. Returns the step
    (which returns the tokens it trained on) and what it trains."""
    from trainer.dpo import dpo_loss  # imports the feedback database's packages too

    train = TrainerConfig()
    model = random_model(config, device, seed=1).to(dtype)
    rng = random.Random(0)
    seqs = [
        Encoded([rng.randrange(5, config.num_tokens) for _ in range(length)], length // 2)
        for _ in range(2 * pairs)  # chosen, rejected, chosen, ...: prompt half, reply half
    ]
    batch = collate(seqs, pad_id=0).to(device)
    autocast = partial(torch.autocast, torch.device(device).type, dtype=dtype)
    with autocast():  # the reference is the base model: LoRA's update starts at zero
        ref = batched_sequence_logprobs(model, seqs, pad_id=0).to(device)
    params = apply_lora(model, train.lora_auto_rank, train.lora_alpha)
    opt = adamw(params, train.preference.lr, train.weight_decay)
    model.train()

    def step() -> int:
        with autocast():
            logps = sequence_logprobs(model, batch)
        loss, _, _ = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], train.preference.beta)
        optimizer_step(opt, loss, params, train.grad_clip)  # backward, clip, AdamW
        return batch.tokens.numel()

    about = {
        "model": "llama",
        "lora_rank": train.lora_auto_rank,
        "pairs": pairs,
        "tokens_per_sequence": length,
        "trainable_params": sum(p.numel() for p in params),
    }
    return step, about


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_deployed_benchmark(
    size: str = "1b",
    device: str = "cuda",
    repeats: int = 5,
    batches: tuple[int, ...] = BATCHES,
    new_tokens: int | None = None,
    out_dir: Path | None = RESULTS_DIR,
    threads: int | None = None,
) -> dict[str, Any]:
    """Every measurement of the module docstring, in one process; returns (and writes) them.
    ``threads`` (default: every core) are the CPU threads of every contender."""
    import transformers

    sizes = SIZES[size]
    batches = tuple(sorted({1, *batches}))  # batch 1 is what the roofline is about
    new_tokens = new_tokens or sizes.new_tokens
    threads = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    cuda = torch.device(device).type == "cuda"
    results: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "device": device,
            "device_name": device_name(device),
            "cores": len(os.sched_getaffinity(0)),
            "cpu_threads": threads,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
        },
        "size": size,
        "dtype": "bfloat16",
        "repeats": repeats,
        "new_tokens": new_tokens,
        "prefill_prompts": {"count": sizes.prefill[0], "tokens": sizes.prefill[1]},
        "models": {},
    }
    engine_config = EngineConfig(
        **{**ENGINE_CONFIG, "max_num_seqs": max(batches)},
        kv_cache_memory_mb=sizes.kv_cache_memory_mb,
        device=device,
        dtype="bfloat16",
        num_threads=threads,
    )
    run = Contenders(device, batches, new_tokens, sizes.prefill, repeats)
    engines = {
        family: run.add(family, config, engine_config, results["models"].setdefault(family, {}))
        for family, config in (("palm", sizes.palm), ("llama", sizes.llama))
    }
    try:
        step, results["dpo"] = dpo_step_fn(sizes.llama, device, torch.bfloat16, *sizes.dpo)
    except ModuleNotFoundError as e:  # a bare GPU machine without sqlalchemy: decode still runs
        results["dpo"] = {"skipped": f"trainer.dpo cannot be imported here: {e}"}
    else:
        step()  # warm-up: autocast's caches, AdamW's state
        run.fns["llama/dpo/step"] = step
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for name, value in _timed_rounds(run.fns, repeats, sync).items():
        family, section, key = name.split("/")
        results["models"][family].setdefault(section, {})[key] = value
    for family, engine in engines.items():
        entry = results["models"][family]
        roof = entry["roofline"] = roofline(engine, {"new_tokens": new_tokens, **entry}, device)
        share = roof["engine_batch1_pct_of_roofline"] / 100
        roof["engine_batch1_share_of_roofline"] = round(share, 4)
        entry["engine_vs_hf"] = {
            b: round(v["median_tokens_per_s"] / entry["hf_generate"][b]["median_tokens_per_s"], 2)
            for b, v in entry["engine"].items()
        }
    if dpo := results["models"]["llama"].pop("dpo", {}).get("step"):
        results["dpo"].update(
            step_seconds=round(dpo["tokens"] / dpo["median_tokens_per_s"], 4),
            runs_seconds=[round(dpo["tokens"] / t, 4) for t in dpo["runs_tokens_per_s"]],
        )
    results["targets"] = targets(results)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if out_dir is not None:
        write_results(results, out_dir, "deployed", plot=False)
    return results


@dataclass
class Contenders:
    """The timed calls of every model, by ``family/section/key``, for one interleaved run."""

    device: str
    batches: tuple[int, ...]
    new_tokens: int
    prefill: tuple[int, int]  # prompts, tokens each
    rounds: int  # timed calls of each contender
    fns: dict[str, Callable[[], int]] = field(default_factory=dict)
    seeds: Iterator[int] = field(default_factory=itertools.count)

    def add(
        self, family: str, config: ModelConfig, engine_config: EngineConfig, entry: dict[str, Any]
    ) -> LLMEngine:
        """A random ``config`` model in the engine, its HF contender, warmed up, their calls
        added; what they are goes into ``entry``. Returns the engine."""
        model = random_model(config, self.device)
        vocab = config.num_tokens
        entry.update(config=config.to_dict(), params=model.num_params())
        if isinstance(model, Llama):
            hf = hf_twin(model, torch.float32)
            entry["hf_contender"] = "transformers LlamaForCausalLM, the same weights"
            entry["hf_max_logit_gap_float32"] = max_logit_gap(model, hf, vocab)
            hf = hf.to(torch.bfloat16)
        else:
            assert isinstance(config, PaLMConfig)
            with torch.device(self.device):  # initialised where it runs, not on the CPU
                hf = hf_llama(config, self.device, torch.bfloat16)
            entry["hf_contender"] = (
                "transformers LlamaForCausalLM of the PaLM's size and multi-query shape, "
                "random weights (transformers has no PaLM class)"
            )
        entry["hf_params"] = sum(p.numel() for p in hf.parameters())
        policy = Policy(f"bench-{family}", model, ByteTokenizer(max(vocab, 261)), {})
        engine = LLMEngine(policy, engine_config)
        prompts = bench_prompts(max(self.batches), vocab)
        for b in self.batches:
            engine_sync(engine, prompts[:b], 2)  # warm-up: records this batch's CUDA graph
            hf_generate(hf, prompts[:b], 2)
            self.fns[f"{family}/engine/{b}"] = partial(
                engine_sync, engine, prompts[:b], self.new_tokens
            )
            self.fns[f"{family}/hf_generate/{b}"] = partial(
                hf_generate, hf, prompts[:b], self.new_tokens
            )
        # drawn before the timing starts, so no timed call pays for making its prompts; past
        # the pool (more calls than rounds), fresh ones are drawn on the spot
        draw = partial(fresh_prompts, *self.prefill, vocab, self.seeds)
        pool = iter([draw() for _ in range(2 * (self.rounds + 1))])

        def fresh() -> list[list[int]]:
            return next(pool, None) or draw()

        self.fns[f"{family}/prefill/engine"] = partial(engine_prefill, engine, fresh)
        self.fns[f"{family}/prefill/hf_forward"] = partial(hf_prefill, hf, fresh)
        self.fns[f"{family}/prefill/engine"]()  # warm-up
        self.fns[f"{family}/prefill/hf_forward"]()
        return engine


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 25's targets per model; they are meant for a GPU at the 1B size."""
    out: dict[str, Any] = {}
    for family, entry in results["models"].items():
        checks = {"batch1_pct_of_roofline": entry["roofline"]["engine_batch1_pct_of_roofline"]}
        if "64" in entry["engine_vs_hf"]:
            checks["batch64_vs_hf"] = entry["engine_vs_hf"]["64"]
        out[family] = {
            k: {"ratio": v, "target": TARGETS[k], "met": v >= TARGETS[k]} for k, v in checks.items()
        }
    return out


def report_table(r: dict[str, Any]) -> str:
    """What a reader looks at: decode and prefill tokens/s by contender, the roofline share,
    the DPO step."""
    m = r["machine"]
    keys = sorted(next(iter(r["models"].values()))["engine"], key=int)
    lines = [
        f"{m['device_name']} ({m['device']}), {r['dtype']}, size {r['size']}, "
        f"{r['new_tokens']} new tokens, median of {r['repeats']} interleaved rounds",
        "",
        "| model | contender | " + " | ".join(f"batch {k}" for k in keys) + " | prefill |",
        "|---|---|" + "---:|" * (len(keys) + 1),
    ]
    for family, e in r["models"].items():
        name = f"{family} {e['params'] / 1e6:,.1f}M"
        for label, section, prefill in (
            ("palmchat engine", "engine", "engine"),
            ("HF transformers generate", "hf_generate", "hf_forward"),
        ):
            cells = [f"{e[section][k]['median_tokens_per_s']:,.0f}" for k in keys]
            cells.append(f"{e['prefill'][prefill]['median_tokens_per_s']:,.0f}")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
        ratios = [f"{e['engine_vs_hf'][k]:.2f}x" for k in keys]
        lines.append(f"| {name} | engine / HF | " + " | ".join(ratios) + " | |")
    lines.append("")
    for family, e in r["models"].items():
        roof = e["roofline"]
        lines.append(
            f"{family}: batch-1 decode {roof['engine_batch1_tokens_per_s']:,.0f} tokens/s = "
            f"{roof['engine_batch1_pct_of_roofline']:.1f}% of the roofline "
            f"{roof['roofline_tokens_per_s']:,} tokens/s ({roof['bytes_per_batch1_token']:,} "
            f"bytes a step at {roof['copy_bandwidth_gb_s']} GB/s measured copy bandwidth)"
            + (f"; one graph step {roof['graph_step_us']} us" if "graph_step_us" in roof else "")
        )
        lines.append(f"{family}: HF contender: {e['hf_contender']}")
    d = r["dpo"]
    lines.append(
        f"DPO/LoRA step: skipped, {d['skipped']}"
        if "skipped" in d
        else f"DPO/LoRA step ({d['model']}, rank {d['lora_rank']}, {d['pairs']} pairs x "
        f"{d['tokens_per_sequence']} tokens, forward + backward + AdamW): "
        f"{d['step_seconds']:.4f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="default: 1b")
    parser.add_argument("--tiny", action="store_true", help="same as --size tiny (CPU, seconds)")
    parser.add_argument(
        "--device", help="cpu or cuda[:N] (default: cuda when PyTorch sees a GPU, else cpu)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="interleaved rounds; every figure is their median"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=list(BATCHES), help="decode batch sizes"
    )
    parser.add_argument("--new-tokens", type=int, help="per request (default: by size)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--threads", type=int, help="CPU threads (default: every core)")
    args = parser.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    if args.repeats < 1 or min(args.batches) < 1 or (args.threads or 1) < 1:
        parser.error("--repeats, --batches and --threads must be positive")
    results = run_deployed_benchmark(
        size="tiny" if args.tiny else args.size,
        device=device,
        repeats=args.repeats,
        batches=tuple(args.batches),
        new_tokens=args.new_tokens,
        out_dir=args.out,
        threads=args.threads,
    )
    print(report_table(results))
    return results


if __name__ == "__main__":
    main()
