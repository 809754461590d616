"""LoRA for the policy models' block projections (https://arxiv.org/abs/2106.09685).

:func:`apply_lora` swaps the block projections for :class:`LoRALinear` (frozen base weight
plus a trainable low-rank update ``B @ A``, B starting at zero so training starts from the
base model) and freezes every other weight; :func:`merge_lora` folds the updates back in, so
a published policy is a plain model of its family that any server loads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.requires_grad_(True)
        return self.base


def _swap(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def apply_lora(model: nn.Module, rank: int, alpha: float = 16.0) -> list[nn.Parameter]:
    """Wrap the block projections of every policy model in ``model`` (each family names its
    own in ``lora_targets``) with LoRA; freeze the rest of those models. Returns the new
    trainable parameters."""
    params: list[nn.Parameter] = []
    trunks = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_targets")]
    for prefix, trunk in trunks:
        trunk.requires_grad_(False)
        targets: tuple[str, ...] = trunk.lora_targets
        for name, module in list(trunk.named_modules()):
            in_block = ".layers." in f".{name}"  # not the embedding or the output projection
            if in_block and isinstance(module, nn.Linear) and name.endswith(targets):
                wrapped = LoRALinear(module, rank, alpha)
                _swap(model, f"{prefix}.{name}" if prefix else name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _swap(model, name, module.merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
