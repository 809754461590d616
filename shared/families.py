"""Model families a policy version can be: the manifest's ``family`` picks the classes.

A version without a ``family`` is PaLM (every version before the Llama family existed). All
families share one forward contract (``shared/model.py``), so only loading and publishing ask
which one a version is.
"""

from __future__ import annotations

from typing import Any

from shared.llama import Llama, LlamaConfig
from shared.model import PaLM, PaLMConfig

PolicyModel = PaLM | Llama
ModelConfig = PaLMConfig | LlamaConfig

FAMILIES: dict[str, tuple[type[PaLMConfig] | type[LlamaConfig], type[PaLM] | type[Llama]]] = {
    PaLM.family: (PaLMConfig, PaLM),
    Llama.family: (LlamaConfig, Llama),
}


def family_of(manifest: dict[str, Any]) -> str:
    """The manifest's family name (PaLM when absent); ValueError for an unknown one."""
    family = manifest.get("family", PaLM.family)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return family


def config_from_dict(family: str, data: dict[str, Any]) -> ModelConfig:
    return FAMILIES[family][0].from_dict(data)


def build_model(config: ModelConfig) -> PolicyModel:
    """A freshly initialised model of the family ``config`` belongs to."""
    if isinstance(config, LlamaConfig):
        return Llama(config)
    return PaLM(config)
