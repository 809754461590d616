"""OpenAI-style chat messages as palmchat templates and stores them: ``{"role", "content"}``.

The role is one of the chat template's roles (OpenAI's ``developer`` is its newer name for
``system``); the content is plain text (OpenAI's list of text parts is joined, other parts are
refused, since no policy here reads images or audio).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.tokenizer import ROLES

ChatMessages = list[dict[str, str]]  # OpenAI-style messages: role and content


class MessageError(ValueError):
    """A message palmchat cannot template: an unknown role or non-text content."""


def message_role(role: Any) -> str:
    role = "system" if role == "developer" else role
    if role not in ROLES:
        raise MessageError(f"unsupported message role {role!r}")
    return role


def message_text(content: Any) -> str:
    """Text of a message's ``content``: a string, None (empty) or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MessageError("message content must be a string or a list of parts")
    parts = []
    for part in content:
        is_text = isinstance(part, Mapping) and part.get("type") == "text"
        if not is_text or not isinstance(part.get("text"), str):
            raise MessageError("only text content parts are supported")
        parts.append(part["text"])
    return "".join(parts)


def normalise_message(message: Mapping[str, Any]) -> dict[str, str]:
    """``message`` as ``{"role", "content"}`` with a template role and plain-text content."""
    return {
        "role": message_role(message.get("role")),
        "content": message_text(message.get("content")),
    }
