"""Tiny random-weight Hugging Face checkpoints of the Llama family, made with transformers'
own ``save_pretrained`` (model, tokenizer, chat template), as a user's directory would be."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "Hello! How can I help you today?",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Please answer briefly: what is two plus two? It is four.",
    "You are a helpful assistant. Be kind, be concise and be correct.",
    "The quick brown fox jumps over the lazy dog; 12345 67890.",
    "Tell me a story about a robot who learned to paint the sea.",
]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Qwen2's pre-tokenizer split: one token per digit, letters runs, punctuation runs, spaces
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Family:
    """One architecture's tiny checkpoint: its config, template and special tokens."""

    name: str
    config: dict[str, Any]
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    stop_ids_extra: tuple[str, ...] = ()  # more stop tokens in generation_config.json
    # the family's own pre-tokenizer split, as its real tokenizer.json has it (transformers
    # rebuilds Qwen2's from its class, so the file must agree with it); None = plain byte-level
    split_regex: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

FAMILIES = {
    "llama": Family(
        "llama",
        dict(
            architecture="LlamaForCausalLM",
            **SHAPE,
            rope_theta=50000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            tie_word_embeddings=False,
        ),
        LLAMA3,
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        stop_ids_extra=("<|end_of_text|>",),
    ),
    "mistral": Family(
        "mistral",
        dict(architecture="MistralForCausalLM", **SHAPE, sliding_window=4096, head_dim=24),
        MISTRAL,
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        bos="<s>",
        eos="</s>",
    ),
    "qwen2": Family(
        "qwen2",
        dict(architecture="Qwen2ForCausalLM", **SHAPE, tie_word_embeddings=True),
        CHATML,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        split_regex=QWEN2_SPLIT,
        stop_ids_extra=("<|endoftext|>",),
    ),
}


def bpe_tokenizer(family: Family):
    """A small byte-level BPE trained on :data:`CORPUS`, its specials added after the BPE
    ids, wrapped as transformers' fast tokenizer with the family's chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    if family.split_regex is None:
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raw.normalizer = normalizers.NFC()
        raw.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(family.split_regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 4, trainer=trainer)
    raw.add_special_tokens(list(family.specials))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.eos,
    )
    tok.chat_template = family.template
    return tok


def make_checkpoint(
    directory: Path, family: str, seed: int = 0, *, shards: bool = False, **config: Any
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` to ``directory``; returns it.

    Weights are perturbed well away from the initialisation so greedy decoding has no
    near-ties (no flip between two implementations' last-bit differences)."""
    import transformers

    spec = FAMILIES[family]
    tok = bpe_tokenizer(spec)
    settings = {**spec.config, **config}
    arch = settings.pop("architecture")
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    model_class = getattr(transformers, arch)
    vocab = len(tok) + 11  # the model's vocabulary is larger than the tokenizer's, as often
    stops = [tok.convert_tokens_to_ids(t) for t in (spec.eos, *spec.stop_ids_extra)]
    hf_config = config_class(
        vocab_size=vocab,
        bos_token_id=tok.convert_tokens_to_ids(spec.bos) if spec.bos else None,
        eos_token_id=stops,
        pad_token_id=tok.convert_tokens_to_ids(spec.eos),
        **settings,
    )
    torch.manual_seed(seed)
    model = model_class(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="40KB" if shards else "5GB")
    tok.save_pretrained(directory)
    return directory


def load_reference(directory: Path):
    """transformers' own model and tokenizer of a checkpoint directory (float32, eval)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)
