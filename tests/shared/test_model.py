"""The PaLM policy: equal to PaLM-rlhf-pytorch's logits, and cached decoding equals full forward."""

from __future__ import annotations

import pytest
import torch

from shared.model import PaLM, PaLMConfig
from tests.shared.cache_check import worst_cached_error

CONFIGS = [
    dict(num_tokens=300, dim=64, depth=2, heads=4, dim_head=16),
    dict(num_tokens=256, dim=96, depth=3, heads=3, dim_head=32, ff_mult=2),
    dict(num_tokens=512, dim=128, depth=2, heads=8, dim_head=16, qk_rmsnorm=True),
    dict(num_tokens=1000, dim=64, depth=4, heads=2, dim_head=64, xpos_scale_base=64),
]


def _reference_kwargs(cfg: dict) -> dict:
    kwargs = dict(cfg)
    if "xpos_scale_base" in kwargs:
        kwargs["rotary_xpos_scale_base"] = kwargs.pop("xpos_scale_base")
    return kwargs


def _perturbed_reference(cfg: dict, seed: int):
    palm_rlhf = pytest.importorskip("palm_rlhf_pytorch")
    torch.manual_seed(seed)
    ref = palm_rlhf.PaLM(**_reference_kwargs(cfg)).eval()
    # random weights everywhere, norms included, so no parameter hides behind an init of zeros
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c['dim']}x{c['depth']}h{c['heads']}")
def test_reference_state_dict_loads_and_gives_same_logits(cfg: dict) -> None:
    ref = _perturbed_reference(cfg, seed=cfg["dim"])
    model = PaLM(PaLMConfig(**cfg)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    tokens = torch.randint(0, cfg["num_tokens"], (3, 77))
    with torch.no_grad():
        diff = (ref(tokens) - model(tokens)).abs().max().item()
    assert diff <= 1e-5


def test_our_state_dict_loads_into_reference() -> None:
    palm_rlhf = pytest.importorskip("palm_rlhf_pytorch")
    cfg = CONFIGS[0]
    model = PaLM(PaLMConfig(**cfg)).eval()
    ref = palm_rlhf.PaLM(**cfg).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    tokens = torch.randint(0, cfg["num_tokens"], (2, 33))
    with torch.no_grad():
        assert (ref(tokens) - model(tokens)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: f"d{c['dim']}x{c['depth']}")
def test_cached_ragged_prefill_then_decode_equals_full_forward(cfg: dict) -> None:
    torch.manual_seed(1)
    model = PaLM(PaLMConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = torch.randint(0, cfg["num_tokens"], (4, 40))
    assert worst_cached_error(model, tokens, prompt_lens=[9, 1, 17, 4]) <= 1e-5


def test_presets_and_config_round_trip() -> None:
    for name in ("tiny", "small", "base"):
        cfg = PaLMConfig.from_name(name, num_tokens=2048)
        assert PaLMConfig.from_dict(cfg.to_dict()) == cfg
    assert PaLM(PaLMConfig.from_name("tiny", num_tokens=300)).num_params() > 0
    with pytest.raises(ValueError, match="preset"):
        PaLMConfig.from_name("huge", num_tokens=10)
    with pytest.raises(ValueError, match="dim_head"):
        PaLMConfig(num_tokens=10, dim=8, depth=1, dim_head=7)


def test_saved_state_excludes_tied_weight_and_restores_it() -> None:
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=300))
    state = model.state_dict_for_save()
    assert "to_logits.weight" not in state
    other = PaLM(PaLMConfig.from_name("tiny", num_tokens=300))
    other.load_saved_state(state)
    assert other.to_logits.weight is other.token_emb.weight
    assert torch.equal(other.token_emb.weight, model.token_emb.weight)


def test_a_model_first_run_under_inference_mode_still_trains() -> None:
    # the rotary tables are built on first use; one built by the serving path must not be an
    # inference tensor that a training step then cannot save for backward
    model = PaLM(PaLMConfig.from_name("tiny", num_tokens=300))
    tokens = torch.randint(0, 300, (2, 9))
    with torch.inference_mode():
        model(tokens)
    model(tokens).logsumexp(-1).mean().backward()
    assert model.token_emb.weight.grad is not None
