"""LoRA: starts as the base model, trains only the low-rank factors, merges into a plain PaLM."""

from __future__ import annotations

import copy

import torch

from shared.model import PaLM, PaLMConfig
from trainer.lora import LoRALinear, apply_lora, has_lora, merge_lora


def test_lora_trains_only_its_factors_and_merges_into_a_plain_palm() -> None:
    torch.manual_seed(0)
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=64, max_seq_len=32))
    base = copy.deepcopy(model)
    tokens = torch.randint(0, 64, (2, 10))
    params = apply_lora(model, rank=4, alpha=8.0)
    assert has_lora(model) and len(params) == 2 * 3 * model.config.depth
    assert torch.allclose(model(tokens), base(tokens), atol=1e-6)  # B = 0: no change yet
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        loss = model(tokens).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = model(tokens).detach()
    assert not torch.allclose(trained, base(tokens), atol=1e-4)
    assert torch.equal(model.token_emb.weight, base.token_emb.weight)  # frozen
    merge_lora(model)
    assert not has_lora(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(tokens), trained, atol=1e-5)
    reloaded = PaLM(model.config)
    reloaded.load_saved_state(model.state_dict_for_save())
    assert torch.allclose(reloaded(tokens), trained, atol=1e-5)
