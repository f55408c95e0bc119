"""What a NIM test server answers: reply plans, tool calls, JSON bodies and the word tokenizer.

Token counts are words: ``prompt_tokens`` is the number of whitespace-separated
words in all message contents plus 3 per message (:func:`count_prompt_tokens`),
``completion_tokens`` the number of words in the reply; ``/tokenize`` agrees.
Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nimpipe.testing.nim_server.settings import NimSettings, ServedModel

__all__ = [
    "ReplyPlan",
    "chunk_json",
    "completion_json",
    "count_prompt_tokens",
    "count_words",
    "dumps",
    "error_body",
    "message_text",
    "plan_reply",
    "prompt_token_ids",
    "stream_deltas",
    "tokenize_messages",
]

_TOOL_PATTERN = re.compile(r"call tool ([A-Za-z0-9_-]+)")
_PIECE_PATTERN = re.compile(r"\S+\s*")
_ROLE_TOKEN_IDS = {"system": 9125, "user": 882, "assistant": 78191, "tool": 23194}
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}


# --------------------------------------------------------------------------
# Token counting
# --------------------------------------------------------------------------


def count_words(text: str) -> int:
    """Token count of ``text`` as this server counts it: whitespace-separated words."""
    return len(text.split())


def message_text(message: Any) -> str:
    """The text of a chat message: its string content, or the ``text`` of its parts."""
    if not isinstance(message, Mapping):
        return ""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return " ".join(texts)
    return str(content)


def count_prompt_tokens(messages: Iterable[Any]) -> int:
    """``usage.prompt_tokens`` this server reports for ``messages``.

    The words of every message's content (a string, or the ``text`` of its
    parts) plus 3 per message.
    """
    return sum(count_words(message_text(m)) + 3 for m in messages)


def _word_token_id(word: str) -> int:
    return 1000 + zlib.crc32(word.encode("utf-8")) % 120000


def tokenize_messages(messages: Sequence[Any]) -> list[int]:
    """Token ids of ``messages``: 3 framing ids per message, then one id per word."""
    tokens: list[int] = []
    for message in messages:
        role = message.get("role") if isinstance(message, Mapping) else None
        tokens += (128006, _ROLE_TOKEN_IDS.get(str(role), 78191), 128007)
        tokens += [_word_token_id(w) for w in message_text(message).split()]
    return tokens


def prompt_token_ids(prompt: str) -> list[int]:
    """Token ids of a plain prompt: one per word."""
    return [_word_token_id(w) for w in prompt.split()]


def _split_pieces(text: str) -> list[str]:
    """Split ``text`` into one piece per word whose concatenation is ``text``."""
    pieces = _PIECE_PATTERN.findall(text)
    lead = text[: len(text) - len(text.lstrip())]
    if not pieces:
        return [text] if text else []
    if lead:
        pieces[0] = lead + pieces[0]
    return pieces


# --------------------------------------------------------------------------
# Planning a reply
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ReplyPlan:
    """What a chat completion answers: text or tool calls, the finish reason, the token count."""

    text: str | None
    tool_calls: list[tuple[str, str, str]]  # (id, name, arguments json)
    finish_reason: str
    completion_tokens: int


def _arguments_json(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {}, separators=(",", ":"))


def _tool_calls_for(body: Mapping[str, Any], settings: NimSettings) -> list[tuple[str, str]]:
    messages = body["messages"]
    last = messages[-1]
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools or choice == "none" or not isinstance(last, Mapping):
        return []
    if last.get("role") == "user":
        text = message_text(last)
        for needle, rule in settings.tool_rules.items():
            if needle in text:
                if isinstance(rule, str):
                    return [(rule, "{}")]
                return [(str(rule["name"]), _arguments_json(rule.get("arguments")))]
        calls = []
        decoder = json.JSONDecoder()
        for match in _TOOL_PATTERN.finditer(text):
            rest = text[match.end() :].lstrip()
            arguments: Any = {}
            if rest.startswith("{"):
                try:
                    arguments, _ = decoder.raw_decode(rest)
                except ValueError:
                    arguments = {}
            calls.append((match.group(1), _arguments_json(arguments)))
        if calls:
            return calls
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        forced = choice["function"].get("name")
        if isinstance(forced, str) and last.get("role") != "tool":
            return [(forced, "{}")]
    return []


def _reply_text(last: Any, model: ServedModel, settings: NimSettings) -> str:
    text = message_text(last)
    for replies in (model.replies, settings.replies):
        for needle, reply in replies.items():
            if needle in text:
                return reply
    if model.reply is not None:
        return model.reply
    if settings.reply is not None:
        return settings.reply
    if isinstance(last, Mapping) and last.get("role") == "tool":
        return f"NIM reply to tool result: {text}"
    return f"NIM reply to: {text}"


def plan_reply(body: Mapping[str, Any], model: ServedModel, settings: NimSettings) -> ReplyPlan:
    """Plan the answer to a valid chat request: a tool call, or text cut at ``max_tokens``."""
    calls = _tool_calls_for(body, settings)
    if calls:
        with_ids = [(f"chatcmpl-tool-{os.urandom(16).hex()}", name, args) for name, args in calls]
        tokens = sum(count_words(f"{name} {args}") for _, name, args in with_ids)
        return ReplyPlan(
            text=None, tool_calls=with_ids, finish_reason="tool_calls", completion_tokens=tokens
        )
    text = _reply_text(body["messages"][-1], model, settings)
    pieces = _split_pieces(text)
    words = len(pieces) if text.strip() else 0
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    finish = "stop"
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < words:
        text = "".join(pieces[:limit]).rstrip()
        words = limit
        finish = "length"
    return ReplyPlan(text=text, tool_calls=[], finish_reason=finish, completion_tokens=words)


# --------------------------------------------------------------------------
# Bodies
# --------------------------------------------------------------------------


def completion_json(
    completion_id: str, created: int, model_id: str, plan: ReplyPlan, usage: dict[str, Any]
) -> dict[str, Any]:
    """The body of a non-streamed chat completion."""
    message: dict[str, Any] = {"role": "assistant", "content": plan.text}
    if plan.tool_calls:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
            for cid, name, args in plan.tool_calls
        ]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": plan.finish_reason,
        "stop_reason": None,
    }
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model_id,
        "choices": [choice],
        "usage": usage,
    }


def stream_deltas(plan: ReplyPlan) -> list[dict[str, Any]]:
    """The ``delta`` of each SSE chunk before the final one, as OpenAI streams them."""
    if not plan.tool_calls:
        pieces = _split_pieces(plan.text or "")
        return [{"role": "assistant", "content": ""}, *({"content": p} for p in pieces)]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None}]
    for index, (cid, name, args) in enumerate(plan.tool_calls):
        function = {"name": name, "arguments": ""}
        deltas.append(
            {"tool_calls": [{"index": index, "id": cid, "type": "function", "function": function}]}
        )
        for start in range(0, len(args), 8):
            fragment = {"arguments": args[start : start + 8]}
            deltas.append({"tool_calls": [{"index": index, "function": fragment}]})
    return deltas


def chunk_json(
    completion_id: str,
    created: int,
    model_id: str,
    choices: list[dict[str, Any]],
    extra: Mapping[str, Any],
) -> bytes:
    """One ``chat.completion.chunk`` of a stream, serialized."""
    return dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": choices,
            **extra,
        }
    )


def error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body (``{"error": {...}}``) for ``status``."""
    if error_type is None:
        error_type = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "Error")
    return {"error": {"message": message, "type": error_type, "param": None, "code": status}}


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as the server sends it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
