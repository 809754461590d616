"""The Llama-family policy gives transformers' logits for Llama, Mistral and Qwen2 checkpoints,
and its cached, ragged forward equals its full forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared.hf_import import load_model, read_checkpoint
from shared.llama import Llama, LlamaConfig
from tests.hf_checkpoints import FAMILIES, load_reference, make_checkpoint
from tests.shared.cache_check import worst_cached_error


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_checkpoint(root / name, name, seed=i) for i, name in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_imported_weights_give_transformers_logits(
    checkpoints: dict[str, Path], family: str
) -> None:
    reference, _ = load_reference(checkpoints[family])
    model = load_model(read_checkpoint(checkpoints[family]))
    tokens = torch.randint(
        0, model.config.num_tokens, (3, 200), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected, got = reference(tokens).logits, model(tokens)
    assert expected.std() > 1  # logits far from uniform: the comparison means something
    assert (expected - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "scaling",
    [None, {"rope_type": "linear", "factor": 2.0}],
    ids=["plain", "linear"],
)
def test_rope_scaling_kinds_match_transformers(tmp_path: Path, scaling: dict | None) -> None:
    directory = make_checkpoint(tmp_path / "ck", "llama", seed=5, rope_scaling=scaling)
    reference, _ = load_reference(directory)
    model = load_model(read_checkpoint(directory))
    tokens = torch.randint(0, model.config.num_tokens, (2, 180))
    with torch.no_grad():
        assert (reference(tokens).logits - model(tokens)).abs().max().item() <= 1e-4


def test_an_unknown_rope_scaling_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported rope_scaling 'yarn'"):
        LlamaConfig(
            num_tokens=10, dim=8, depth=1, heads=2, kv_heads=1, dim_head=4, ff_inner_dim=8,
            rope_scaling={"rope_type": "yarn", "factor": 4.0},
        )  # fmt: skip


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cached_ragged_prefill_then_decode_equals_full_forward(kv_heads: int) -> None:
    torch.manual_seed(kv_heads)
    config = LlamaConfig(
        num_tokens=97, dim=48, depth=2, heads=4, kv_heads=kv_heads, dim_head=12,
        ff_inner_dim=64, qkv_bias=True, max_seq_len=64,
    )  # fmt: skip
    model = Llama(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, config.num_tokens, (3, 30))
    assert worst_cached_error(model, tokens, prompt_lens=[7, 1, 12]) <= 1e-4


def test_tied_embeddings_are_saved_once_and_load_back() -> None:
    config = LlamaConfig(
        num_tokens=50, dim=16, depth=1, heads=2, kv_heads=1, dim_head=8, ff_inner_dim=32,
        tie_embeddings=True,
    )  # fmt: skip
    model = Llama(config)
    saved = model.state_dict_for_save()
    assert "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    again = Llama(config)
    again.load_saved_state(saved)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    tokens = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))
    assert model.num_params() == sum(v.numel() for v in saved.values())
