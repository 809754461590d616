"""LoRA: starts as the base model, trains only the low-rank factors, merges into a plain PaLM."""

from __future__ import annotations

import copy

import torch

from shared.llama import Llama, LlamaConfig
from shared.model import PaLM, PaLMConfig
from trainer.config import TrainerConfig
from trainer.lora import LoRALinear, apply_lora, has_lora, merge_lora


def _train(model: torch.nn.Module, params: list[torch.nn.Parameter], tokens: torch.Tensor) -> None:
    """Three SGD steps on the given parameters only."""
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        loss = model(tokens).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lora_trains_only_its_factors_and_merges_into_a_plain_palm() -> None:
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=64, max_seq_len=32))
    base = copy.deepcopy(model)
    tokens = torch.randint(0, 64, (2, 10))
    params = apply_lora(model, rank=4, alpha=8.0)
    assert has_lora(model) and len(params) == 2 * 3 * model.config.depth
    assert torch.allclose(model(tokens), base(tokens), atol=1e-6)  # B = 0: no change yet
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    _train(model, params, tokens)
    trained = model(tokens).detach()
    assert not torch.allclose(trained, base(tokens), atol=1e-4)
    assert torch.equal(model.token_emb.weight, base.token_emb.weight)  # frozen
    merge_lora(model)
    assert not has_lora(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(tokens), trained, atol=1e-5)
    reloaded = PaLM(model.config)
    reloaded.load_saved_state(model.state_dict_for_save())
    assert torch.allclose(reloaded(tokens), trained, atol=1e-5)


def test_a_llama_family_model_trains_its_seven_projections_and_nothing_else() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_tokens=64, dim=32, depth=2, heads=4, kv_heads=2, dim_head=8, ff_inner_dim=48,
        max_seq_len=32,
    )  # fmt: skip
    model = Llama(config)
    base = copy.deepcopy(model)
    params = apply_lora(model, rank=4)
    assert len(params) == 2 * 7 * config.depth  # q, k, v, o, gate, up, down in every block
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    tokens = torch.randint(0, 64, (2, 10))
    _train(model, params, tokens)
    merge_lora(model)
    assert not has_lora(model)
    for name, weight in model.state_dict().items():
        in_block = name.endswith(Llama.lora_targets, 0, -len(".weight"))
        assert torch.equal(weight, base.state_dict()[name]) != in_block, name


def test_lora_is_the_default_above_a_hundred_million_parameters() -> None:
    config = TrainerConfig()
    assert config.lora_rank_for(150_000_000) == 16
    assert config.lora_rank_for(6_000_000) == 0  # the bundled seed's size: full fine-tuning
    assert TrainerConfig.from_flat(lora_rank=0).lora_rank_for(10**9) == 0
    assert TrainerConfig.from_flat(lora_rank=8).lora_rank_for(1_000) == 8
