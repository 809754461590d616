"""Structured outputs at the API: OpenAI's ``response_format`` and vLLM's ``guided_*`` extras
mapped to the engine's :class:`~server.engine.GuidedDecoding` (enforced by constrained
decoding, :mod:`server.engine.guided`)."""

from __future__ import annotations

import json

from server.api.protocol import APIError, ChatCompletionRequest
from server.engine import GrammarError, GuidedDecoding
from server.engine.guided import check_grammar
from shared.tokenizer import Tokenizer


def guided_decoding(req: ChatCompletionRequest, tok: Tokenizer) -> GuidedDecoding | None:
    """The grammar the request's ``response_format`` or ``guided_*`` asks for (None: free
    text), checked against the serving tokenizer: 400 naming the parameter when it cannot
    compile."""
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        param, guided = "response_format", GuidedDecoding("json_object")
    elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        spec = json.dumps(fmt.json_schema.json_schema)
        param, guided = "response_format.json_schema.schema", GuidedDecoding("json_schema", spec)
    elif req.guided_json is not None:
        value = req.guided_json
        spec = value if isinstance(value, str) else json.dumps(value)
        param, guided = "guided_json", GuidedDecoding("json_schema", spec)
    elif req.guided_regex is not None:
        param, guided = "guided_regex", GuidedDecoding("regex", req.guided_regex)
    elif req.guided_choice is not None:
        param, guided = "guided_choice", GuidedDecoding("choice", json.dumps(req.guided_choice))
    else:
        return None
    try:
        check_grammar(guided, tok)
    except GrammarError as e:
        raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
    return guided
