"""An imported Llama-family checkpoint served by the engine: greedy output through continuous
batching over the paged cache equals transformers' own ``generate``, token for token, for a
ragged batch, with one, several and as many KV heads as query heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from server.engine import LLMEngine, SamplingParams
from server.engine.config import EngineConfig
from shared.checkpoints import PolicyRegistry
from shared.hf_import import import_hf_checkpoint
from tests.hf_checkpoints import FAMILIES, load_reference, make_checkpoint

NEW_TOKENS = 24
KV_HEADS = {"llama": 1, "mistral": 2, "qwen2": 4}  # of 4 query heads: MQA, GQA, full MHA


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, LLMEngine]]:
    """Each family's tiny checkpoint, imported into a registry and loaded by an engine."""
    root = tmp_path_factory.mktemp("hf_engine")
    out = {}
    for i, family in enumerate(FAMILIES):
        directory = make_checkpoint(
            root / family, family, seed=10 + i, num_key_value_heads=KV_HEADS[family]
        )
        registry = PolicyRegistry(root / f"registry_{family}")
        version = import_hf_checkpoint(registry, directory)
        config = EngineConfig(block_size=16, num_blocks=64, max_num_seqs=8, seed=0)
        out[family] = (directory, LLMEngine.from_registry(registry, version, config))
    return out


def _hf_greedy(reference, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # the end token is ignored, as the engine's ignore_eos
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_ragged_batch_equals_transformers_generate(served, family: str) -> None:
    directory, engine = served[family]
    reference, _ = load_reference(directory)
    rng = torch.Generator().manual_seed(3)
    vocab = engine.current.runner.model.config.num_tokens
    lengths = [5, 1, 23, 40, 12]  # ragged, one spanning several cache blocks
    prompts = [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    batched = engine.generate(prompts, params)
    for prompt, (out,) in zip(prompts, batched, strict=True):
        assert out.token_ids == _hf_greedy(reference, prompt, NEW_TOKENS), len(prompt)
