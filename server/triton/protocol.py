"""What the gateway and the Triton model say to each other: tensor names, the model config,
and the encoding of requests and :class:`~server.engine.Delta` responses.

One Triton model, ``palmchat``, in decoupled mode (one request → a stream of responses). Policy
version ``vN`` is Triton model version ``N``. Per request:

inputs   PROMPT_IDS  INT32 [-1]  prompt token ids (optional when MESSAGES is given)
         MESSAGES    BYTES [1]   JSON chat messages; the model applies the chat template
         PARAMS      BYTES [1]   JSON SamplingParams (``{"stats": true}`` asks for engine stats)
outputs  INDEX       INT32 [1]   candidate index (``n`` > 1)
         TOKEN_IDS   INT32 [-1]  new token ids
         TEXT        BYTES [1]   new text (UTF-8)
         LOGPROBS    BYTES [1]   JSON ``[[token_id, logprob, [[id, logprob], ...]], ...]`` or ""
         FINISH_REASON BYTES [1] "stop" / "length" / "cancelled", "" while running
         POLICY_VERSION BYTES [1] the version that wrote it
         METRICS     BYTES [1]   JSON RequestMetrics on a candidate's last response, else ""

The last response of a request (every candidate finished) carries Triton's final flag.

Model config parameters (strings): ``registry_dir``, and ``engine_config``, the JSON of the
:class:`~server.engine.EngineConfig` the engine inside Triton runs with.

Only numpy and the engine's dataclasses are imported here: both sides use this module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from server.engine.config import EngineConfig
from server.engine.outputs import Delta, RequestMetrics
from server.engine.sampling import SamplingParams
from server.engine.sequence import FinishReason, TokenLogprob
from server.engine.stats import EngineStats

MODEL_NAME = "palmchat"
ENGINE_PARAMETER = "engine_config"
OVERLOADED_PREFIX = "overloaded: "
INVALID_PREFIX = "invalid request: "

INPUTS = (
    ("PROMPT_IDS", "TYPE_INT32", [-1], True),
    ("MESSAGES", "TYPE_STRING", [1], True),
    ("PARAMS", "TYPE_STRING", [1], False),
)
OUTPUTS = (
    ("INDEX", "TYPE_INT32", [1]),
    ("TOKEN_IDS", "TYPE_INT32", [-1]),
    ("TEXT", "TYPE_STRING", [1]),
    ("LOGPROBS", "TYPE_STRING", [1]),
    ("FINISH_REASON", "TYPE_STRING", [1]),
    ("POLICY_VERSION", "TYPE_STRING", [1]),
    ("METRICS", "TYPE_STRING", [1]),
)


def version_number(version: str) -> int:
    """``"v3"`` → 3 (Triton model versions are positive integers)."""
    if not (version.startswith("v") and version[1:].isdigit() and int(version[1:]) > 0):
        raise ValueError(f"not a policy version name: {version!r}")
    return int(version[1:])


def model_config(
    versions: Iterable[str], parameters: dict[str, Any], *, name: str = MODEL_NAME
) -> dict[str, Any]:
    """The model config (JSON form, as the model-control API takes it) serving ``versions``."""
    return {
        "name": name,
        "backend": "python",
        "max_batch_size": 0,
        "model_transaction_policy": {"decoupled": True},
        "version_policy": {"specific": {"versions": sorted(version_number(v) for v in versions)}},
        "input": [
            {"name": n, "data_type": t, "dims": d, "optional": opt} for n, t, d, opt in INPUTS
        ],
        "output": [{"name": n, "data_type": t, "dims": d} for n, t, d in OUTPUTS],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {k: {"string_value": str(v)} for k, v in parameters.items()},
    }


# -- requests -----------------------------------------------------------------------------------
def params_to_json(params: SamplingParams) -> str:
    data = dataclasses.asdict(params)
    data["stop"] = list(params.stop)
    return json.dumps(data)


def params_from_json(text: str) -> SamplingParams:
    data = _fields_from_json(SamplingParams, text, "PARAMS", "sampling parameters")
    if "stop" in data and isinstance(data["stop"], list):
        data["stop"] = tuple(data["stop"])
    return SamplingParams(**data)


def config_to_json(config: EngineConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> EngineConfig:
    return EngineConfig(**_fields_from_json(EngineConfig, text, ENGINE_PARAMETER, "engine options"))


def _fields_from_json(cls: type, text: str, name: str, what: str) -> dict[str, Any]:
    """The JSON object ``text`` (empty: ``{}``) as keyword arguments of dataclass ``cls``."""
    data = json.loads(text) if text else {}
    if not isinstance(data, dict):
        raise ValueError(f"{name} must be a JSON object")
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}")
    return data


def bytes_tensor(text: str) -> np.ndarray:
    return np.array([text.encode()], dtype=np.object_)


def text_of(array: np.ndarray | None) -> str:
    if array is None or array.size == 0:
        return ""
    value = array.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


# -- responses ----------------------------------------------------------------------------------
def delta_to_arrays(delta: Delta) -> dict[str, np.ndarray]:
    logprobs = ""
    if delta.logprobs:
        logprobs = json.dumps(
            [[lp.token_id, lp.logprob, [list(t) for t in lp.top]] for lp in delta.logprobs]
        )
    metrics = json.dumps(dataclasses.asdict(delta.metrics)) if delta.metrics else ""
    finish = str(delta.finish_reason.value) if delta.finish_reason is not None else ""
    return {
        "INDEX": np.array([delta.index], dtype=np.int32),
        "TOKEN_IDS": np.array(delta.token_ids, dtype=np.int32),
        "TEXT": bytes_tensor(delta.text),
        "LOGPROBS": bytes_tensor(logprobs),
        "FINISH_REASON": bytes_tensor(finish),
        "POLICY_VERSION": bytes_tensor(delta.policy_version),
        "METRICS": bytes_tensor(metrics),
    }


def delta_from_arrays(request_id: str, get) -> Delta:
    """Rebuild a Delta from a response; ``get(name)`` returns an output as a numpy array."""
    logprobs_json = text_of(get("LOGPROBS"))
    logprobs = None
    if logprobs_json:
        logprobs = [
            TokenLogprob(int(t), float(lp), [(int(i), float(v)) for i, v in top])
            for t, lp, top in json.loads(logprobs_json)
        ]
    metrics_json = text_of(get("METRICS"))
    finish = text_of(get("FINISH_REASON"))
    return Delta(
        request_id=request_id,
        index=int(get("INDEX").reshape(-1)[0]),
        token_ids=[int(t) for t in get("TOKEN_IDS").reshape(-1)],
        text=text_of(get("TEXT")),
        logprobs=logprobs,
        finish_reason=FinishReason(finish) if finish else None,
        policy_version=text_of(get("POLICY_VERSION")),
        metrics=RequestMetrics(**json.loads(metrics_json)) if metrics_json else None,
    )


def stats_to_json(stats: EngineStats) -> str:
    data = {f: getattr(stats, f) for f in EngineStats.__slots__ if f != "recent"}
    return json.dumps(data)


def stats_from_json(text: str) -> EngineStats:
    data = json.loads(text)
    known = set(EngineStats.__slots__) - {"recent"}
    return EngineStats(**{k: v for k, v in data.items() if k in known})
