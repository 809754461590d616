"""Offline generation through the serving engine: a batch of prompts in, their completions out.

The terminal chat, held-out evaluation, PPO/DPO rollouts and the promotion gate all generate
here, so they sample with the server's code (continuous batching, paged KV cache, the one
sampler) instead of a loop of their own::

    (done,) = generate(model, tokenizer, [prompt_ids], SamplingParams(temperature=0))
    done.token_ids, done.text, done.finish_reason

The engine is sized for the batch (every prompt running at once, blocks for all of them) and
serves a copy of ``model``: building a worker rewrites a model in place for serving (dtype cast,
transposed weight layout, untied output projection, ``requires_grad_(False)``), which must not
happen to the caller's model, e.g. one in training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.outputs import Delta
from server.engine.sampling import SamplingParams
from shared.checkpoints import Policy
from shared.families import PolicyModel
from shared.tokenizer import Tokenizer

BLOCK_SIZE = 16
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def engine_config_for(
    model: PolicyModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, seed: int = 0
) -> EngineConfig:
    """An engine config that runs every prompt at once on ``model``'s device and dtype, with
    enough blocks for each to reach ``max_new_tokens`` (or the model's context)."""
    dtype = next(model.parameters()).dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"the engine serves float32, bfloat16 or float16, not {dtype}")
    limit = model.config.max_seq_len
    blocks = sum(
        math.ceil(min(len(p) + max_new_tokens + 1, limit) / BLOCK_SIZE) + 1 for p in prompts
    )
    device = model.device
    return EngineConfig(
        block_size=BLOCK_SIZE,
        num_blocks=blocks + 4,
        max_num_seqs=len(prompts),
        max_batched_tokens=max(4096, len(prompts) * max(len(p) for p in prompts)),
        max_waiting=len(prompts) + 1,
        device=str(device),
        dtype=_DTYPE_NAMES[dtype],
        # the caller's thread setting, which the engine restores after each generate
        num_threads=torch.get_num_threads() if device.type == "cpu" else None,
        seed=seed,
    )


@torch.no_grad()
def generate(
    model: PolicyModel,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    seed: int = 0,
) -> list[Delta]:
    """Complete each prompt (token ids) with ``params``; one final delta per prompt, in order,
    holding all its token ids (the end token not included) and its whole text.

    Rows without a ``params.seed`` draw from one generator seeded with ``seed``, so repeating a
    prompt gives independent samples. Each prompt needs 1 to ``max_seq_len - 1`` tokens."""
    if params.n != 1:
        raise ValueError("offline generate takes one candidate per prompt; repeat the prompt")
    if not prompts:
        return []
    config = engine_config_for(model, prompts, params.max_tokens, seed)
    policy = Policy(version="offline", model=copy.deepcopy(model), tokenizer=tokenizer, manifest={})
    engine = LLMEngine(policy, config)
    return [delta for (delta,) in engine.generate(prompts, params)]
