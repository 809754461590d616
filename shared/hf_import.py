"""Import a local Hugging Face checkpoint of the Llama family as a policy version.

A checkpoint directory as ``save_pretrained`` writes it::

    config.json              LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM
    model.safetensors        or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    tokenizer.json           a BPE tokenizer (byte-level, or sentencepiece pieces + byte fallback)
    tokenizer_config.json    special tokens; the chat template, unless chat_template.jinja has it
    generation_config.json   optional: the stop tokens (eos_token_id)

becomes a registry version (family ``llama``, the weights under transformers' names, the
tokenizer with its template). Everything else is refused with a message that says what is
wrong: another architecture, a missing file, pickled ``.bin`` weights (never unpickled), weights
whose names or shapes do not fit the config, a tokenizer the model cannot use. Nothing is
downloaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer as RustTokenizer

from shared.checkpoints import PolicyRegistry
from shared.hf_tokenizer import TEMPLATE_TOKENS, ChatTemplateError, HuggingFaceTokenizer
from shared.llama import Llama, LlamaConfig
from shared.tokenizer import TokenizerError

log = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# the context served when the checkpoint allows more: a longer one is --max-seq-len
DEFAULT_CONTEXT = 4096
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE, WEIGHTS_FILE = "model.safetensors.index.json", "model.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ImportRefused(ValueError):
    """A checkpoint palmchat will not import; the message says why."""


@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint directory, read and checked, before its weights are loaded."""

    directory: Path
    architecture: str
    config: LlamaConfig
    tokenizer: HuggingFaceTokenizer
    weight_files: tuple[Path, ...]
    dtype: str  # the weights' dtype, kept when published


def _json(directory: Path, name: str, required: bool = True) -> dict[str, Any]:
    path = directory / name
    if not path.is_file():
        if required:
            raise ImportRefused(f"{directory}: {name} is missing")
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImportRefused(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: expected a JSON object")
    return data


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and the scaling dict, from transformers 5's ``rope_parameters`` or the
    ``rope_theta`` + ``rope_scaling`` of earlier files."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ImportRefused("partial rotary embeddings (partial_rotary_factor) are not supported")
    scaling.pop("partial_rotary_factor", None)
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return float(theta), None
    return float(theta), scaling


def llama_config(hf: dict[str, Any], max_seq_len: int | None = None) -> tuple[str, LlamaConfig]:
    """The architecture and the :class:`LlamaConfig` of a checkpoint's ``config.json``."""
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise ImportRefused(
            f"unsupported architecture {arch!r}; palmchat imports {', '.join(ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ImportRefused(f"unsupported hidden_act {hf.get('hidden_act')!r} (needs silu)")
    kinds = set(hf.get("layer_types") or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        raise ImportRefused(f"unsupported layer types {sorted(kinds)}")
    try:
        heads = int(hf["num_attention_heads"])
        dim = int(hf["hidden_size"])
        theta, scaling = _rope(hf)
        qwen = arch == "Qwen2ForCausalLM"
        window = hf.get("sliding_window")
        if qwen and not hf.get("use_sliding_window"):
            window = None
        limits = [int(hf.get("max_position_embeddings") or DEFAULT_CONTEXT)]
        # attention inside the window is full causal attention: cap the context there
        limits += [int(window)] if window else []
        limits += [max_seq_len] if max_seq_len else [DEFAULT_CONTEXT]
        config = LlamaConfig(
            num_tokens=int(hf["vocab_size"]),
            dim=dim,
            depth=int(hf["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(hf.get("num_key_value_heads") or heads),
            dim_head=int(hf.get("head_dim") or dim // heads),
            ff_inner_dim=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qwen or bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)) and not qwen,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_seq_len=min(limits),
        )
    except KeyError as e:
        raise ImportRefused(f"config.json lacks {e}") from None
    except (TypeError, ValueError) as e:
        raise ImportRefused(f"config.json: {e}") from None
    return arch, config


def _weight_files(directory: Path) -> tuple[Path, ...]:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if (directory / INDEX_FILE).is_file():
        weight_map = _json(directory, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ImportRefused(f"{directory / INDEX_FILE}: no weight_map")
        shards = sorted(set(map(str, weight_map.values())))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise ImportRefused(f"{directory}: shard {missing[0]} named in {INDEX_FILE} is missing")
        if any(not s.endswith(".safetensors") for s in shards):
            raise ImportRefused(f"{INDEX_FILE} names non-safetensors shards")
        return tuple(directory / s for s in shards)
    if (directory / WEIGHTS_FILE).is_file():
        if pickles:
            log.info("ignoring %s beside %s", ", ".join(pickles), WEIGHTS_FILE)
        return (directory / WEIGHTS_FILE,)
    if pickles:
        raise ImportRefused(
            f"{directory}: the weights are pickles ({', '.join(pickles)}), which palmchat never "
            "loads (unpickling runs code); convert them to safetensors first"
        )
    raise ImportRefused(f"{directory}: {WEIGHTS_FILE} (or {INDEX_FILE} and its shards) is missing")


def _saved_shapes(files: tuple[Path, ...]) -> tuple[dict[str, tuple[int, ...]], set[torch.dtype]]:
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: set[torch.dtype] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is no mapping
                    if name in shapes:
                        raise ImportRefused(f"{path.name}: tensor {name} is in two shards")
                    shapes[name] = tuple(f.get_slice(name).get_shape())
                    dtypes.add(f.get_slice(name).get_dtype())
        except (SafetensorError, OSError) as e:
            raise ImportRefused(f"{path}: unreadable safetensors ({e})") from None
    return shapes, dtypes


def _kept(name: str, config: LlamaConfig) -> bool:
    """Saved tensors the model has no place for and needs none: old checkpoints' rotary
    frequencies, a tied checkpoint's copy of the embedding."""
    return not name.endswith("rotary_emb.inv_freq") and not (
        config.tie_embeddings and name == "lm_head.weight"
    )


def check_weights(config: LlamaConfig, files: tuple[Path, ...]) -> str:
    """Refuse weights whose names or shapes do not fit ``config`` (read from the headers and
    a model on the meta device); return the dtype the weights are stored in."""
    saved, dtypes = _saved_shapes(files)
    saved = {k: v for k, v in saved.items() if _kept(k, config)}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Llama(config).state_dict_for_save().items()}
    if saved != expected:
        missing = sorted(expected.keys() - saved.keys())
        extra = sorted(saved.keys() - expected.keys())
        wrong = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
        problems = []
        if wrong:
            k = wrong[0]
            problems.append(
                f"{len(wrong)} mismatched shapes, e.g. {k}: {saved[k]} saved, "
                f"{expected[k]} for config.json"
            )
        if missing:
            problems.append(f"{len(missing)} missing tensors, e.g. {missing[0]}")
        if extra:
            problems.append(f"{len(extra)} unexpected tensors, e.g. {extra[0]}")
        raise ImportRefused("the weights do not fit config.json: " + "; ".join(problems))
    names = [_DTYPE_NAMES.get(d) for d in dtypes]
    return names[0] if len(names) == 1 and names[0] else "float32"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: text or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(directory: Path, tok_config: dict[str, Any]) -> str:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if not isinstance(template, str) or not template.strip():
        raise ImportRefused(
            f"{directory}: no chat template (neither chat_template.jinja nor a chat_template in "
            "tokenizer_config.json)"
        )
    return template


def read_tokenizer(
    directory: Path, hf_config: dict[str, Any], num_tokens: int
) -> HuggingFaceTokenizer:
    """The checkpoint's tokenizer, chat template, special and stop tokens."""
    spec = _json(directory, "tokenizer.json")
    tok_config = _json(directory, "tokenizer_config.json")
    decoder = json.dumps(spec.get("decoder"))
    if "ByteLevel" not in decoder and "\u2581" not in decoder and "Metaspace" not in decoder:
        raise ImportRefused(
            f"tokenizer.json: unsupported decoder {decoder[:80]} (palmchat reads byte-level BPE "
            "and sentencepiece-style BPE tokenizers)"
        )
    template = _chat_template(directory, tok_config)
    names = {k: t for k in TEMPLATE_TOKENS if (t := _token_text(tok_config.get(k)))}
    gen = _json(directory, "generation_config.json", required=False)
    stop = gen.get("eos_token_id", hf_config.get("eos_token_id"))
    stop_ids = [stop] if isinstance(stop, int) else [i for i in stop or [] if isinstance(i, int)]
    try:
        rust = RustTokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises plain Exception
        raise ImportRefused(f"tokenizer.json does not load: {e}") from None
    stop_tokens = [t for i in stop_ids if (t := rust.id_to_token(i)) is not None]
    end = names.get("eos_token") or (stop_tokens[0] if stop_tokens else None)
    if end is None:
        raise ImportRefused("no end token: tokenizer_config.json names no eos_token")
    try:
        tok = HuggingFaceTokenizer(
            spec,
            chat_template=template,
            num_tokens=num_tokens,
            template_tokens=names,
            end_token=end,
            stop_tokens=stop_tokens,
            pad_token=names.get("pad_token"),
        )
        tok.chat_ids([{"role": "user", "content": "Hello!"}])
    except (TokenizerError, ChatTemplateError) as e:
        raise ImportRefused(f"tokenizer: {e}") from None
    return tok


def read_checkpoint(directory: str | Path, max_seq_len: int | None = None) -> HFCheckpoint:
    """Read and check everything but the weights' values."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ImportRefused(f"{directory}: no such directory")
    hf = _json(directory, "config.json")
    arch, config = llama_config(hf, max_seq_len)
    files = _weight_files(directory)
    tokenizer = read_tokenizer(directory, hf, config.num_tokens)
    dtype = check_weights(config, files)
    return HFCheckpoint(directory, arch, config, tokenizer, files, dtype)


def load_model(checkpoint: HFCheckpoint) -> Llama:
    """The checkpoint's weights in a float32 :class:`Llama` (their names and shapes checked)."""
    config = checkpoint.config
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint.weight_files:
        state.update((k, v.float()) for k, v in load_file(str(path)).items() if _kept(k, config))
    model = Llama(config)
    model.load_saved_state(state)
    return model.eval()


def import_hf_checkpoint(
    registry: PolicyRegistry, directory: str | Path, *, max_seq_len: int | None = None
) -> str:
    """Publish the checkpoint in ``directory`` as a new version (its weights' dtype kept);
    returns the version. ImportRefused says what is wrong with a checkpoint it will not take."""
    checkpoint = read_checkpoint(directory, max_seq_len)
    model = load_model(checkpoint)
    return registry.publish(
        model,
        checkpoint.tokenizer,
        dtype=checkpoint.dtype,
        recipe={
            "imported_from": str(checkpoint.directory.resolve()),
            "source": "huggingface",
            "architecture": checkpoint.architecture,
        },
    )
