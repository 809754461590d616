"""What grammar-constrained decoding costs: batch-32 decoding with every row under a JSON schema
(or a regex) against the same batch unconstrained, in interleaved rounds on one engine.

The grammars have a fixed length, so both sides generate exactly the same number of tokens
and the ratio of tokens/s is the cost of the masks alone:

    palmchat bench guided            # JSON under ops/bench/results/guided-latest.json
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.engine import ENGINE_CONFIG, bench_policy, bench_prompts
from server.engine.config import EngineConfig
from server.engine.guided import GuidedDecoding
from server.engine.llm_engine import LLMEngine
from server.engine.sampling import SamplingParams

RESULTS_DIR = Path("ops/bench/results")
TARGET = 0.8  # constrained tokens/s at least this share of unconstrained (at most 20% cost)


def fixed_length_grammars(new_tokens: int) -> dict[str, GuidedDecoding]:
    """Grammars whose every match is ``new_tokens`` one-byte tokens long (the bench policy's
    tokenizer is byte-level): a JSON array of one-digit integers and a regex."""
    items = max(1, new_tokens // 3)  # "[d" + ", d" * (items - 1) + "]" = 3 * items bytes
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": items,
        "maxItems": items,
    }
    return {
        "json_schema": GuidedDecoding("json_schema", json.dumps(schema)),
        "regex": GuidedDecoding("regex", f"[a-z]{{{3 * items}}}"),
    }


def run_guided_benchmark(
    batch: int = 32,
    new_tokens: int = 96,
    repeats: int = 5,
    out_dir: Path | None = RESULTS_DIR,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    policy = bench_policy()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    engine = LLMEngine(policy, EngineConfig(**{**ENGINE_CONFIG, "num_threads": threads}))
    prompts = bench_prompts(batch, policy.model.config.num_tokens)
    grammars = fixed_length_grammars(new_tokens)
    length = 3 * max(1, new_tokens // 3)
    contenders: dict[str, SamplingParams] = {
        "unconstrained": SamplingParams(
            temperature=1.0, seed=0, max_tokens=length, ignore_eos=True
        ),
        **{
            name: SamplingParams(temperature=1.0, seed=0, max_tokens=length + 1, guided=g)
            for name, g in grammars.items()
        },
    }
    engine.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    valid: dict[str, bool] = {}
    for r in range(repeats):
        for name, params in contenders.items():  # interleaved: a slow spell hits all alike
            start = time.perf_counter()
            out = engine.generate(prompts, params)
            seconds = time.perf_counter() - start
            texts = [c.text for req in out for c in req]
            tokens = sum(len(c.token_ids) for req in out for c in req)
            runs[name].append(tokens / seconds)
            if name == "json_schema":
                valid[name] = all(len(json.loads(t)) == length // 3 for t in texts)
            elif name == "regex":
                valid[name] = all(len(t) == length and t.isalpha() for t in texts)
        progress(f"round {r + 1}/{repeats}")
    median = {name: statistics.median(v) for name, v in runs.items()}
    ratios = {name: round(median[name] / median["unconstrained"], 3) for name in grammars}
    results: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "model": {**policy.model.config.to_dict(), "params": policy.model.num_params()},
        "batch": batch,
        "tokens_per_row": length,
        "repeats": repeats,
        "tokens_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "tokens_per_s_runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "constrained_vs_unconstrained": ratios,
        "every_output_valid": valid,
        "targets": {
            name: {"value": ratio, "target": TARGET, "met": ratio >= TARGET}
            for name, ratio in ratios.items()
        },
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = results["created_at"].replace(":", "").replace("+0000", "")
        text = json.dumps(results, indent=2) + "\n"
        (out_dir / f"guided-{stamp}.json").write_text(text)
        (out_dir / "guided-latest.json").write_text(text)
    return results
