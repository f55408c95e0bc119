"""A NIM-shaped HTTP server for tests, benchmarks and demos.

:class:`NimServer` speaks the parts of the NVIDIA NIM for LLMs API that
nimpipe uses, with the same JSON shapes as a self-hosted NIM (vLLM behind an
OpenAI-compatible front end):

- ``POST /v1/chat/completions``, streaming (SSE) and not, with tool calls,
  ``usage``, ``max_tokens`` truncation and context-length errors;
- ``GET /v1/models`` (and ``/v1/models/{id}``) with ``max_model_len`` and
  ``parent`` for LoRA adapters;
- ``GET /v1/health/live`` and ``GET /v1/health/ready`` with a loading phase;
- ``GET /v1/metrics`` (also ``/metrics``): Prometheus text with the NIM metric
  names, or the ``vllm:`` names;
- ``POST /tokenize`` (also ``/v1/tokenize``) whose counts agree with ``usage``.

Replies are deterministic: ``"NIM reply to: <text of the last message>"``
unless a ``reply``/``replies`` setting says otherwise. Token counts are words:
``prompt_tokens`` is the number of whitespace-separated words in all message
contents plus 3 per message (:func:`count_prompt_tokens`), ``completion_tokens``
the number of words in the reply.  A request whose ``tools`` is non-empty and
whose last message is a user message containing ``call tool NAME`` (optionally
followed by a JSON object of arguments) is answered with a tool call.

Tests script failures with :meth:`NimServer.inject` (see :data:`FAULT_KINDS`)
and inspect traffic with :meth:`NimServer.stats` and :attr:`NimServer.requests`.

The server is a raw HTTP/1.1 implementation on asyncio streams with
keep-alive; it adds about 0.1 ms per request.  It runs either in
a daemon thread of the test process (``with NimServer() as srv: ...``) or as
its own process::

    python -m nimpipe.testing.nim_server --port 8000 --latency 0.05

which prints ``READY http://127.0.0.1:PORT/v1`` once listening and serves until
SIGTERM or SIGINT.  A server in another process is driven over its admin
endpoints (``/_admin/config``, ``/_admin/fault``, ``/_admin/stats``,
``/_admin/requests``, ``/_admin/ready``, ``/_admin/reset``), most easily
through :class:`RemoteNimServer` or :class:`NimServerProcess`.

Importing this module is cheap: it uses the standard library only and loads
asyncio when a server starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    import subprocess

__all__ = [
    "DEFAULT_MODEL",
    "FAULT_KINDS",
    "Fault",
    "NimServer",
    "NimServerProcess",
    "NimSettings",
    "RecordedRequest",
    "RemoteNimServer",
    "closed_port_url",
    "count_prompt_tokens",
    "count_words",
    "main",
]

#: Model id served when neither ``model`` nor ``models`` is configured.
DEFAULT_MODEL = "meta/llama-3.1-8b-instruct"

#: Fault kinds accepted by :meth:`NimServer.inject`, each with the parameters
#: it takes:
#:
#: - ``status``: answer ``status`` (default 500) with an OpenAI-style JSON
#:   error; ``message``, a raw ``body`` (dict or str) and extra ``headers``
#:   may be given.
#: - ``rate_limit``: 429 with ``Retry-After: retry_after`` (default 1) and a
#:   JSON error; optional ``message``.
#: - ``auth``: 401 with a JSON error; optional ``message``.
#: - ``malformed``: 200, ``content-type: application/json``, a body that is
#:   not valid JSON (``body`` overrides it).  A streaming request gets an SSE
#:   stream whose first event is not valid JSON.
#: - ``malformed_shape``: 200 with valid JSON that lacks ``choices`` (for a
#:   streaming request, an SSE chunk without ``choices``).
#: - ``cut_stream``: a streaming request gets the headers and ``chunks``
#:   (default 2) SSE events, then the connection closes; any other request
#:   gets the headers and ``fraction`` (default 0.5) of the body, then the
#:   connection closes.
#: - ``stall``: no answer until the client goes away or ``stall_seconds``
#:   (default: forever) elapse, then the connection closes.  With
#:   ``after_chunks=N`` a streaming request first gets N SSE events.
#: - ``drop``: the connection closes without any response.
#: - ``delay``: wait ``seconds`` (default 1.0), then answer normally.
FAULT_KINDS: Mapping[str, frozenset[str]] = {
    "status": frozenset({"status", "message", "body", "headers"}),
    "rate_limit": frozenset({"retry_after", "message"}),
    "auth": frozenset({"message"}),
    "malformed": frozenset({"body"}),
    "malformed_shape": frozenset(),
    "cut_stream": frozenset({"chunks", "fraction"}),
    "stall": frozenset({"stall_seconds", "after_chunks"}),
    "drop": frozenset(),
    "delay": frozenset({"seconds"}),
}

_CHAT_PATH = "/v1/chat/completions"
_READ_LIMIT = 1 << 20
_MASKED_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key"})
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
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_TOOL_PATTERN = re.compile(r"call tool ([A-Za-z0-9_-]+)")
_PIECE_PATTERN = re.compile(r"\S+\s*")
_ROLE_TOKEN_IDS = {"system": 9125, "user": 882, "assistant": 78191, "tool": 23194}
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
)
_TOKEN_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
    20000.0,
    50000.0,
    100000.0,
)
_VLLM_RENAMES = {
    "gpu_cache_usage_perc": "kv_cache_usage_perc",
    "request_finish_total": "request_success_total",
}


# --------------------------------------------------------------------------
# Settings, faults and records
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class NimSettings:
    """Behaviour of a :class:`NimServer`; every field is also a constructor keyword.

    Change settings at run time with :meth:`NimServer.configure` (or
    ``POST /_admin/config`` with a JSON object of fields).
    """

    #: Id of the single served model; ignored when ``models`` is given.
    model: str = DEFAULT_MODEL
    #: Several served models, each an id or a dict with ``id`` and optionally
    #: ``max_model_len``, ``parent`` (base model of a LoRA adapter), ``root``,
    #: ``owned_by``, and per-model ``reply``, ``replies`` and ``latency``
    #: which take precedence over the server-wide settings.
    models: list[Any] | None = None
    #: Context length of models that do not set their own.
    max_model_len: int = 131072
    #: Seconds to wait before answering a chat completion (before the first
    #: SSE chunk of a stream; the headers of a stream are sent at once).
    latency: float = 0.0
    #: Seconds between SSE chunks of a stream.
    token_delay: float = 0.0
    #: Seconds after start during which the server is "loading": health/ready
    #: answers 503 and so do chat completions and tokenize.
    ready_after: float = 0.0
    #: Fixed reply text for every chat completion.
    reply: str | None = None
    #: Substring of the last message -> reply text; the first match wins and
    #: takes precedence over ``reply``.
    replies: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Substring of the last user message -> tool call, given as a tool name
    #: or ``{"name": ..., "arguments": {...}}``; used when the request has
    #: ``tools``, before the ``call tool NAME`` pattern.
    tool_rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: When set, ``/v1`` endpoints and ``/tokenize`` require
    #: ``Authorization: Bearer <api_key>`` and answer 401 otherwise.
    api_key: str | None = None
    #: Prefix of metric names: ``""`` for NIM names, ``"vllm:"`` for vLLM
    #: names (which also renames ``gpu_cache_usage_perc`` to
    #: ``kv_cache_usage_perc`` and ``request_finish_total`` to
    #: ``request_success_total``).
    metrics_prefix: str = ""
    #: Value reported as ``num_requests_waiting`` instead of the real count.
    waiting_override: int | None = None
    #: Value reported as ``gpu_cache_usage_perc`` (a fraction, 0..1) instead
    #: of running / ``num_request_max``.
    kv_cache_override: float | None = None
    #: Requests processed at once; further requests wait (and are counted in
    #: ``num_requests_waiting``).
    num_request_max: int = 256
    #: Number of most recent requests kept in :attr:`NimServer.requests`.
    max_recorded: int = 10000

    def evolve(self, **changes: Any) -> NimSettings:
        """Return a copy with ``changes`` applied; unknown names raise ``TypeError``."""
        unknown = sorted(set(changes) - _SETTING_NAMES)
        if unknown:
            raise TypeError(f"unknown NimServer setting(s): {', '.join(unknown)}")
        if "model" in changes and "models" not in changes:
            changes["models"] = None
        new = dataclasses.replace(self, **changes)
        new._resolve_models()
        return new

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-compatible dict (what ``GET /_admin/config`` returns)."""
        return dataclasses.asdict(self)

    def _resolve_models(self) -> dict[str, _Model]:
        entries: list[Any] = list(self.models) if self.models else [self.model]
        resolved: dict[str, _Model] = {}
        for entry in entries:
            spec: dict[str, Any] = {"id": entry} if isinstance(entry, str) else dict(entry)
            if not isinstance(spec.get("id"), str):
                raise ValueError(f"a model needs a string 'id': {entry!r}")
            unknown = set(spec) - _MODEL_KEYS
            if unknown:
                raise ValueError(f"unknown model key(s) {sorted(unknown)} in {entry!r}")
            model = _Model(
                id=spec["id"],
                max_model_len=int(spec.get("max_model_len", self.max_model_len)),
                parent=spec.get("parent"),
                root=spec.get("root", spec["id"]),
                owned_by=spec.get("owned_by", "system"),
                reply=spec.get("reply"),
                replies=dict(spec.get("replies") or {}),
                latency=spec.get("latency"),
            )
            resolved[model.id] = model
        return resolved


_SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(NimSettings))
_MODEL_KEYS = frozenset(
    {"id", "max_model_len", "parent", "root", "owned_by", "reply", "replies", "latency"}
)


@dataclasses.dataclass(frozen=True)
class _Model:
    id: str
    max_model_len: int
    parent: str | None
    root: str
    owned_by: str
    reply: str | None
    replies: dict[str, str]
    latency: float | None

    def card(self, created: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": created,
            "owned_by": self.owned_by,
            "root": self.root,
            "parent": self.parent,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{zlib.crc32(self.id.encode()):08x}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }


@dataclasses.dataclass
class Fault:
    """A queued fault: ``kind`` (a key of :data:`FAULT_KINDS`) and its parameters.

    It applies to requests whose path equals ``path`` (``None``: any path but
    the admin ones) and, when ``model`` is set, whose JSON body names that
    model.  ``count`` is how many more requests it applies to; ``None`` means
    every matching request until it is cleared.
    """

    kind: str
    count: int | None = 1
    path: str | None = _CHAT_PATH
    model: str | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        allowed = FAULT_KINDS.get(self.kind)
        if allowed is None:
            raise ValueError(
                f"unknown fault kind {self.kind!r}; expected one of {list(FAULT_KINDS)}"
            )
        unknown = set(self.params) - allowed
        if unknown:
            raise ValueError(f"fault {self.kind!r} takes no parameter(s) {sorted(unknown)}")
        if self.count is not None and self.count < 1:
            raise ValueError("fault count must be at least 1, or None for a permanent fault")

    def matches(self, path: str, model: str | None) -> bool:
        """Whether a request to ``path`` for ``model`` is subject to this fault."""
        if self.path is not None and self.path != path:
            return False
        return self.model is None or self.model == model

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as accepted by ``POST /_admin/fault``."""
        return {
            "kind": self.kind,
            "count": self.count,
            "path": self.path,
            "model": self.model,
            **self.params,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from its JSON form (``kind``, ``count``, ``path``, ``model``, params)."""
        data = dict(data)
        if "kind" not in data:
            raise ValueError("a fault needs a 'kind'")
        kind = data.pop("kind")
        count = data.pop("count", 1)
        path = data.pop("path", _CHAT_PATH)
        model = data.pop("model", None)
        return cls(kind=kind, count=count, path=path, model=model, params=data)


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """A request the server received (admin requests are not recorded).

    ``headers`` has lower-case names; credentials (``authorization`` and API
    key headers) are masked.  ``body`` is the parsed JSON body, or ``None``
    when the body is empty or not JSON.  ``time`` is ``time.time()`` when the
    request was read.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    time: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as returned by ``GET /_admin/requests``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecordedRequest:
        """Inverse of :meth:`to_dict`."""
        return cls(
            method=data["method"],
            path=data["path"],
            query=data.get("query", ""),
            headers=dict(data.get("headers", {})),
            body=data.get("body"),
            time=float(data.get("time", 0.0)),
        )


def _mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    masked = dict(headers)
    for name in _MASKED_HEADERS & masked.keys():
        scheme, sep, _ = masked[name].partition(" ")
        masked[name] = f"{scheme} ***" if sep else "***"
    return masked


# --------------------------------------------------------------------------
# Token counting and reply planning
# --------------------------------------------------------------------------


def count_words(text: str) -> int:
    """Token count of ``text`` as this server counts it: whitespace-separated words."""
    return len(text.split())


def _message_text(message: Any) -> str:
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
    return sum(count_words(_message_text(m)) + 3 for m in messages)


def _word_token_id(word: str) -> int:
    return 1000 + zlib.crc32(word.encode("utf-8")) % 120000


def _tokenize_messages(messages: Sequence[Any]) -> list[int]:
    tokens: list[int] = []
    for message in messages:
        role = message.get("role") if isinstance(message, Mapping) else None
        tokens += (128006, _ROLE_TOKEN_IDS.get(str(role), 78191), 128007)
        tokens += [_word_token_id(w) for w in _message_text(message).split()]
    return tokens


def _split_pieces(text: str) -> list[str]:
    """Split ``text`` into one piece per word whose concatenation is ``text``."""
    pieces = _PIECE_PATTERN.findall(text)
    lead = text[: len(text) - len(text.lstrip())]
    if not pieces:
        return [text] if text else []
    if lead:
        pieces[0] = lead + pieces[0]
    return pieces


@dataclasses.dataclass
class _Plan:
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
        text = _message_text(last)
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


def _reply_text(last: Any, model: _Model, settings: NimSettings) -> str:
    text = _message_text(last)
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


def _plan_reply(body: Mapping[str, Any], model: _Model, settings: NimSettings) -> _Plan:
    calls = _tool_calls_for(body, settings)
    if calls:
        with_ids = [(f"chatcmpl-tool-{os.urandom(16).hex()}", name, args) for name, args in calls]
        tokens = sum(count_words(f"{name} {args}") for _, name, args in with_ids)
        return _Plan(
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
    return _Plan(text=text, tool_calls=[], finish_reason=finish, completion_tokens=words)


def _completion_json(
    completion_id: str, created: int, model_id: str, plan: _Plan, usage: dict[str, Any]
) -> dict[str, Any]:
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


def _stream_deltas(plan: _Plan) -> list[dict[str, Any]]:
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


def _error_body(status: int, message: str, error_type: str | None = None) -> dict[str, Any]:
    if error_type is None:
        error_type = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "Error")
    return {"error": {"message": message, "type": error_type, "param": None, "code": status}}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str) -> list[str]:
        out = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {float(running)}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(self.count)}')
        out.append(f"{name}_count{{{labels}}} {float(self.count)}")
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        return out


class _ModelMetrics:
    __slots__ = (
        "e2e",
        "finished",
        "generation_tokens",
        "prompt_tokens",
        "request_gen",
        "request_prompt",
        "running",
        "tpot",
        "ttft",
        "waiting",
    )

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.tpot = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_LATENCY_BUCKETS)
        self.request_prompt = _Histogram(_TOKEN_BUCKETS)
        self.request_gen = _Histogram(_TOKEN_BUCKETS)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_metrics(
    settings: NimSettings, models: Iterable[str], metrics: Mapping[str, _ModelMetrics]
) -> str:
    prefix = settings.metrics_prefix

    def name(base: str) -> str:
        if prefix == "vllm:":
            base = _VLLM_RENAMES.get(base, base)
        return prefix + base

    per_model = [
        (m, f'model_name="{_label(m)}"', metrics.get(m) or _ModelMetrics()) for m in models
    ]
    lines: list[str] = []

    def family(base: str, kind: str, help_text: str, rows: Iterable[str]) -> None:
        full = name(base)
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        lines.extend(row.replace("\0", full) for row in rows)

    family(
        "num_requests_running",
        "gauge",
        "Number of requests currently running on GPU.",
        [f"\0{{{lb}}} {float(mm.running)}" for _, lb, mm in per_model],
    )
    waiting_rows = []
    for _, lb, mm in per_model:
        waiting = mm.waiting if settings.waiting_override is None else settings.waiting_override
        waiting_rows.append(f"\0{{{lb}}} {float(waiting)}")
    family(
        "num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting_rows
    )
    family(
        "num_request_max",
        "gauge",
        "Max number of concurrently running requests.",
        [f"\0{{{lb}}} {float(settings.num_request_max)}" for _, lb, _ in per_model],
    )
    usage_rows = []
    for _, lb, mm in per_model:
        if settings.kv_cache_override is not None:
            usage = float(settings.kv_cache_override)
        else:
            usage = min(1.0, mm.running / max(1, settings.num_request_max))
        usage_rows.append(f"\0{{{lb}}} {usage}")
    family(
        "gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage. 1 means 100 percent usage.",
        usage_rows,
    )
    family(
        "prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        [f"\0{{{lb}}} {float(mm.prompt_tokens)}" for _, lb, mm in per_model],
    )
    family(
        "generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        [f"\0{{{lb}}} {float(mm.generation_tokens)}" for _, lb, mm in per_model],
    )
    finish_rows = []
    for _, lb, mm in per_model:
        for reason in sorted({"stop", "length", "tool_calls", "abort"} | mm.finished.keys()):
            count = float(mm.finished.get(reason, 0))
            finish_rows.append(f'\0{{{lb},finished_reason="{reason}"}} {count}')
    family(
        "request_finish_total",
        "counter",
        "Count of finished requests by finish reason.",
        finish_rows,
    )
    histograms = [
        ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
        ("time_per_output_token_seconds", "Histogram of time per output token in seconds.", "tpot"),
        (
            "e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            "e2e",
        ),
        (
            "request_prompt_tokens",
            "Number of prefill tokens processed per request.",
            "request_prompt",
        ),
        (
            "request_generation_tokens",
            "Number of generation tokens processed per request.",
            "request_gen",
        ),
    ]
    for base, help_text, attr in histograms:
        full = name(base)
        rows = []
        for _, lb, mm in per_model:
            rows.extend(getattr(mm, attr).lines(full, lb))
        family(base, "histogram", help_text, rows)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------


class _Close(Exception):
    """Ends the connection without a further response."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_UNPARSED = object()


class _Request:
    __slots__ = ("_json", "body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self, method: str, target: str, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self._json: Any = _UNPARSED

    @property
    def json(self) -> Any:
        """The parsed JSON body; ``None`` when empty or invalid."""
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.body) if self.body else None
            except ValueError:
                self._json = None
        return self._json

    @property
    def model(self) -> str | None:
        body = self.json
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            return body["model"]
        return None

    @property
    def wants_stream(self) -> bool:
        body = self.json
        return isinstance(body, dict) and body.get("stream") is True


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> _Request | None:
    import asyncio

    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest(400, "incomplete request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest(431, "request head too large") from exc
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"bad request line {lines[0]!r}")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(400, f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        else:
            length = int(headers.get("content-length") or 0)
            body = await reader.readexactly(length) if length > 0 else b""
    except ValueError as exc:
        raise _BadRequest(400, "bad content-length or chunk size") from exc
    except asyncio.IncompleteReadError:
        return None
    return _Request(method, target, headers, body, keep_alive)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _head(status: int, headers: Iterable[tuple[str, str]], keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{k}: {v}" for k, v in headers)
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Exchange:
    """Writes the response to one request, shaped by the fault that applies to it."""

    __slots__ = ("events_sent", "fault", "keep_alive", "reader", "request", "writer")

    def __init__(
        self,
        request: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fault: Fault | None,
    ) -> None:
        self.request = request
        self.reader = reader
        self.writer = writer
        self.fault = fault
        self.keep_alive = request.keep_alive
        self.events_sent = 0

    def _fault_param(self, kind: str, name: str, default: Any) -> Any:
        if self.fault is None or self.fault.kind != kind:
            return None
        return self.fault.params.get(name, default)

    async def _write(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise _Close
        self.writer.write(data)
        await self.writer.drain()

    async def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        all_headers = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        fraction = self._fault_param("cut_stream", "fraction", 0.5)
        if fraction is not None:
            cut = max(0, min(len(body) - 1, int(len(body) * float(fraction))))
            await self._write(_head(status, all_headers, True) + body[:cut])
            raise _Close
        await self._write(_head(status, all_headers, self.keep_alive) + body)

    async def send_json(
        self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        await self.send(status, _dumps(obj), headers=headers)

    async def send_error(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        await self.send_json(status, _error_body(status, message, error_type), headers)

    async def start_stream(self) -> None:
        headers = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
        ]
        await self._write(_head(200, headers, self.keep_alive))

    async def send_event(self, payload: bytes) -> None:
        """Send one SSE ``data:`` event; applies ``cut_stream`` and ``stall`` faults."""
        data = b"data: " + payload + b"\n\n"
        await self._write(b"%x\r\n%s\r\n" % (len(data), data))
        self.events_sent += 1
        cut_after = self._fault_param("cut_stream", "chunks", 2)
        if cut_after is not None and self.events_sent >= int(cut_after):
            raise _Close
        stall_after = self._fault_param("stall", "after_chunks", None)
        if stall_after is not None and self.events_sent >= int(stall_after):
            await self.stall()

    async def end_stream(self) -> None:
        if self._fault_param("cut_stream", "chunks", 2) is not None:
            raise _Close
        await self._write(b"0\r\n\r\n")

    async def stall(self) -> None:
        """Wait until the client goes away or ``stall_seconds`` elapse, then close."""
        import asyncio

        seconds = self._fault_param("stall", "stall_seconds", None)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + float(seconds)
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise _Close
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except (asyncio.TimeoutError, ConnectionError) as exc:
                raise _Close from exc
            if not data:
                raise _Close


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class NimServer:
    """A NIM-shaped HTTP server on 127.0.0.1, in a daemon thread of this process.

    ``NimServer(**settings)`` takes the fields of :class:`NimSettings` as
    keywords, plus ``host`` and ``port`` (0, the default, picks a free port).
    :meth:`start` returns once the server listens; :meth:`stop` closes it and
    every open connection.  Use it as a context manager::

        with NimServer(latency=0.01) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="x")

    A stopped server can be started again; it then listens on the same port.
    Every method is thread-safe.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> None:
        self.host = host
        self._bind_port = port
        self._initial = NimSettings().evolve(**settings)
        self._settings = self._initial
        self._models = self._initial._resolve_models()
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._records: deque[RecordedRequest] = deque(maxlen=max(1, self._initial.max_recorded))
        self._counts: dict[tuple[str, str], int] = {}
        self._metrics: dict[str, _ModelMetrics] = {}
        self._ready_override: bool | None = None
        self._ready_at = 0.0
        self._created = int(time.time())
        self._running_total = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 10.0) -> NimServer:
        """Start serving in a daemon thread; returns ``self`` once listening."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("NimServer is already running")
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.serve_forever(on_ready=lambda _: started.set())
            except BaseException as exc:  # reported to the thread calling start()
                errors.append(exc)
            finally:
                started.set()

        self._thread = threading.Thread(target=run, name=f"NimServer-{id(self):x}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"NimServer did not start within {timeout} s")
        if errors:
            self._thread.join()
            raise errors[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close every connection; a no-op when not running."""
        loop, event, thread = self._loop, self._stop_event, self._thread
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(event.set)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"NimServer did not stop within {timeout} s")
            self._thread = None

    def __enter__(self) -> NimServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def serve_forever(
        self,
        *,
        on_ready: Callable[[NimServer], None] | None = None,
        handle_signals: bool = False,
    ) -> None:
        """Serve in the calling thread until :meth:`stop` (or SIGTERM/SIGINT).

        ``on_ready`` is called with the server once it listens.  With
        ``handle_signals`` (main thread only) SIGTERM and SIGINT stop it.
        """
        import asyncio

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop, on_ready, handle_signals))
        finally:
            self._loop = None
            self._stop_event = None
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        on_ready: Callable[[NimServer], None] | None,
        handle_signals: bool,
    ) -> None:
        import asyncio

        stop_event = asyncio.Event()
        server = await asyncio.start_server(
            self._on_connection, self.host, self._bind_port, limit=_READ_LIMIT, backlog=1024
        )
        self._port = server.sockets[0].getsockname()[1]
        self._bind_port = self._port
        with self._lock:
            self._ready_at = time.monotonic() + self._settings.ready_after
        self._loop = loop
        self._stop_event = stop_event
        if handle_signals:
            import signal

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop_event.set)
        try:
            if on_ready is not None:
                on_ready(self)
            await stop_event.wait()
        finally:
            # Stop accepting first, then let connections accepted in the meantime
            # reach their handlers (whose ``finally`` closes the socket) while the
            # server is still open: asyncio cannot attach a connection to a closed
            # server, and such a connection would leak its socket.
            for sock in server.sockets:
                with contextlib.suppress(NotImplementedError):
                    loop.remove_reader(sock.fileno())
            for _ in range(5):
                await asyncio.sleep(0)
            server.close()
            # The loop belongs to this server, so every other task on it serves a
            # connection.
            current = asyncio.current_task()
            while True:
                others = [t for t in asyncio.all_tasks() if t is not current]
                if not others:
                    break
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)
            await server.wait_closed()
            # Closed transports release their sockets in callbacks scheduled on this loop.
            for _ in range(3):
                await asyncio.sleep(0)

    # -- addresses ---------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; known once the server has started."""
        if self._port is None:
            raise RuntimeError("NimServer has not been started")
        return self._port

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (where ``/tokenize``, ``/metrics`` and ``/_admin`` live)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, the OpenAI-compatible base URL."""
        return f"{self.root_url}/v1"

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "not started"
        return f"<NimServer {where} models={list(self._models)}>"

    # -- control -----------------------------------------------------------

    @property
    def settings(self) -> NimSettings:
        """The current settings."""
        return self._settings

    def configure(self, **settings: Any) -> NimSettings:
        """Change settings (fields of :class:`NimSettings`); returns the new settings.

        Setting ``ready_after`` restarts the loading phase from now; setting
        ``model`` alone replaces ``models``.
        """
        with self._lock:
            new = self._settings.evolve(**settings)
            self._apply_settings(new)
            if "ready_after" in settings:
                self._ready_at = time.monotonic() + new.ready_after
                self._ready_override = None
        self._wake_waiters()
        return new

    def _apply_settings(self, new: NimSettings) -> None:
        self._models = new._resolve_models()
        self._settings = new
        if new.max_recorded != self._records.maxlen:
            self._records = deque(self._records, maxlen=max(1, new.max_recorded))

    def set_ready(self, ready: bool | None) -> None:
        """Force readiness: True (ready), False (loading) or None (back to the clock)."""
        with self._lock:
            self._ready_override = ready

    @property
    def ready(self) -> bool:
        """Whether the server is past its loading phase."""
        with self._lock:
            if self._ready_override is not None:
                return self._ready_override
            return self._port is not None and time.monotonic() >= self._ready_at

    def inject(
        self,
        kind: str,
        count: int | None = 1,
        path: str | None = _CHAT_PATH,
        *,
        model: str | None = None,
        **params: Any,
    ) -> Fault:
        """Queue a fault for the next ``count`` matching requests (None: all of them).

        ``kind`` is a key of :data:`FAULT_KINDS`, ``params`` its parameters.
        Faults are consumed in the order they were queued by requests to
        ``path`` (None: any path) for ``model`` (None: any model).
        """
        fault = Fault(kind=kind, count=count, path=path, model=model, params=params)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Drop every queued and permanent fault."""
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        """A snapshot of the pending faults."""
        with self._lock:
            return [dataclasses.replace(f) for f in self._faults]

    def stats(self) -> dict[tuple[str, str], int]:
        """Number of requests received per ``(method, path)`` (admin requests excluded)."""
        with self._lock:
            return dict(self._counts)

    def count(self, path: str = _CHAT_PATH, method: str | None = None) -> int:
        """Number of requests received for ``path`` (with any method unless ``method``)."""
        with self._lock:
            return sum(
                n
                for (m, p), n in self._counts.items()
                if p == path and (method is None or m == method)
            )

    @property
    def in_flight(self) -> int:
        """Chat completions being processed right now."""
        return self._running_total

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Restore the constructor's settings and clear faults, records, counts and metrics.

        The loading clock is not restarted; a :meth:`set_ready` override is dropped.
        """
        with self._lock:
            self._apply_settings(self._initial)
            self._faults.clear()
            self._records.clear()
            self._counts.clear()
            self._metrics = {}
            self._ready_override = None
        self._wake_waiters()

    # -- internals: bookkeeping ----------------------------------------------

    def _wake_waiters(self) -> None:
        loop = self._loop
        if loop is None:
            return

        def wake() -> None:
            while self._slot_waiters:
                fut = self._slot_waiters.popleft()
                if not fut.done():
                    fut.set_result(None)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake)

    def _record_and_take_fault(self, req: _Request) -> Fault | None:
        headers = _mask_headers(req.headers)
        record = RecordedRequest(req.method, req.path, req.query, headers, req.json, time.time())
        key = (req.method, req.path)
        with self._lock:
            self._records.append(record)
            self._counts[key] = self._counts.get(key, 0) + 1
            if not self._faults:
                return None
            model = req.model
            for i, fault in enumerate(self._faults):
                if fault.matches(req.path, model):
                    taken = dataclasses.replace(fault, params=dict(fault.params))
                    if fault.count is not None:
                        fault.count -= 1
                        if fault.count <= 0:
                            del self._faults[i]
                    return taken
        return None

    def _model_metrics(self, model_id: str) -> _ModelMetrics:
        with self._lock:
            mm = self._metrics.get(model_id)
            if mm is None:
                mm = self._metrics[model_id] = _ModelMetrics()
            return mm

    async def _acquire_slot(self, mm: _ModelMetrics) -> None:
        import asyncio

        if self._running_total >= self._settings.num_request_max:
            loop = asyncio.get_running_loop()
            mm.waiting += 1
            try:
                while self._running_total >= self._settings.num_request_max:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._slot_waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if not fut.done():
                            fut.cancel()
            finally:
                mm.waiting -= 1
        self._running_total += 1
        mm.running += 1

    def _release_slot(self, mm: _ModelMetrics) -> None:
        self._running_total -= 1
        mm.running -= 1
        while self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    # -- internals: connections ------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        import asyncio

        try:
            while True:
                try:
                    req = await _read_request(reader, writer)
                except _BadRequest as exc:
                    body = _dumps(_error_body(exc.status, str(exc)))
                    writer.write(
                        _head(
                            exc.status,
                            [
                                ("content-type", "application/json"),
                                ("content-length", str(len(body))),
                            ],
                            False,
                        )
                        + body
                    )
                    await writer.drain()
                    return
                if req is None:
                    return
                if not await self._dispatch(req, reader, writer):
                    return
        except (_Close, ConnectionError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels connection tasks; ending quietly keeps asyncio from
            # reporting the cancellation as an error of the connection callback.
            pass
        finally:
            writer.close()

    async def _dispatch(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; returns whether the connection stays open."""
        if req.path.startswith("/_admin/"):
            ex = _Exchange(req, reader, writer, None)
            status, payload = self._admin(req)
            await ex.send_json(status, payload)
            return ex.keep_alive
        fault = self._record_and_take_fault(req)
        ex = _Exchange(req, reader, writer, fault)
        try:
            if fault is not None and await self._apply_fault(fault, ex):
                return False
            await self._route(req, ex)
        except _Close:
            return False
        except Exception as exc:
            if writer.transport.is_closing():
                return False
            ex.fault = None
            ex.keep_alive = False
            await ex.send_error(500, f"test server error: {type(exc).__name__}: {exc}")
            return False
        return ex.keep_alive

    async def _apply_fault(self, fault: Fault, ex: _Exchange) -> bool:
        """Apply a fault that replaces the normal answer; returns whether it did."""
        import asyncio

        params = fault.params
        kind = fault.kind
        if kind == "delay":
            await asyncio.sleep(float(params.get("seconds", 1.0)))
            return False
        if kind == "drop":
            raise _Close
        if kind == "stall":
            if params.get("after_chunks") is not None and ex.request.wants_stream:
                return False
            await ex.stall()
        if kind == "cut_stream":
            return False
        ex.keep_alive = False
        if kind == "status":
            status = int(params.get("status", 500))
            headers = list(dict(params.get("headers") or {}).items())
            body = params.get("body")
            if body is None:
                message = params.get("message") or f"{_REASONS.get(status, 'Error')} (injected)"
                await ex.send_error(status, message, headers=headers)
            elif isinstance(body, str):
                await ex.send(status, body.encode("utf-8"), headers=headers)
            else:
                await ex.send_json(status, body, headers=headers)
        elif kind == "rate_limit":
            retry_after = params.get("retry_after", 1)
            message = params.get("message") or f"Rate limit exceeded; retry after {retry_after} s."
            await ex.send_error(429, message, headers=[("retry-after", str(retry_after))])
        elif kind == "auth":
            await ex.send_error(401, params.get("message") or "Invalid API key (injected).")
        elif kind in ("malformed", "malformed_shape"):
            await self._send_malformed(ex, kind, params)
        return True

    async def _send_malformed(self, ex: _Exchange, kind: str, params: Mapping[str, Any]) -> None:
        model = ex.request.model or next(iter(self._models))
        created = int(time.time())
        if kind == "malformed":
            payload = params.get("body") or '{"id": "chatcmpl-malformed", "object": "chat.compl'
            data = payload.encode("utf-8") if isinstance(payload, str) else _dumps(payload)
        elif ex.request.wants_stream:
            data = _dumps(
                {
                    "id": "chatcmpl-malformed",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                }
            )
        else:
            data = _dumps(
                {
                    "id": "chatcmpl-malformed",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        if ex.request.wants_stream:
            await ex.start_stream()
            await ex.send_event(data)
            await ex.send_event(b"[DONE]")
            await ex.end_stream()
        else:
            await ex.send(200, data)

    async def _route(self, req: _Request, ex: _Exchange) -> None:
        path, method = req.path, req.method
        if path in ("/v1/health/live", "/v1/health/ready", "/health", "/v1/metrics", "/metrics"):
            if method != "GET":
                await ex.send_json(405, {"detail": "Method Not Allowed"})
            elif path == "/v1/health/live":
                await ex.send_json(
                    200,
                    {"object": "health.response", "message": "Service is live.", "status": "live"},
                )
            elif path in ("/v1/health/ready", "/health"):
                if self.ready:
                    await ex.send_json(
                        200,
                        {
                            "object": "health.response",
                            "message": "Service is ready.",
                            "status": "ready",
                        },
                    )
                else:
                    await ex.send_json(
                        503,
                        {
                            "object": "health.response",
                            "message": "Service is not ready: model is loading.",
                            "status": "loading",
                        },
                    )
            else:
                with self._lock:
                    text = _render_metrics(self._settings, self._models, self._metrics)
                await ex.send(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
            return
        handler: Callable[[_Request, _Exchange], Any] | None = None
        if path == _CHAT_PATH:
            handler = self._chat if method == "POST" else None
        elif path in ("/tokenize", "/v1/tokenize"):
            handler = self._tokenize if method == "POST" else None
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            handler = self._list_models if method == "GET" else None
        else:
            await ex.send_json(404, {"detail": "Not Found"})
            return
        if handler is None:
            await ex.send_json(405, {"detail": "Method Not Allowed"})
            return
        api_key = self._settings.api_key
        if api_key is not None and req.headers.get("authorization") != f"Bearer {api_key}":
            await ex.send_error(401, "Unauthorized: send 'Authorization: Bearer <api key>'.")
            return
        await handler(req, ex)

    # -- internals: endpoints --------------------------------------------------

    async def _list_models(self, req: _Request, ex: _Exchange) -> None:
        models = self._models
        if req.path.startswith("/v1/models/"):
            model = models.get(req.path[len("/v1/models/") :])
            if model is None:
                await ex.send_error(404, f"The model `{req.path[11:]}` does not exist.")
            else:
                await ex.send_json(200, model.card(self._created))
            return
        await ex.send_json(
            200, {"object": "list", "data": [m.card(self._created) for m in models.values()]}
        )

    def _lookup_model(self, body: Mapping[str, Any]) -> tuple[_Model | None, str]:
        models = self._models
        name = body.get("model")
        if name is None:
            first = next(iter(models.values()))
            return first, first.id
        return models.get(name) if isinstance(name, str) else None, str(name)

    async def _tokenize(self, req: _Request, ex: _Exchange) -> None:
        body = req.json
        if not isinstance(body, dict):
            await ex.send_error(400, "The request body must be a JSON object.")
            return
        if not self.ready:
            await ex.send_error(503, "The model is loading; try again later.")
            return
        model, name = self._lookup_model(body)
        if model is None:
            await ex.send_error(404, f"The model `{name}` does not exist.")
            return
        if isinstance(body.get("messages"), list):
            tokens = _tokenize_messages(body["messages"])
        elif isinstance(body.get("prompt"), str):
            tokens = [_word_token_id(w) for w in body["prompt"].split()]
        else:
            await ex.send_error(400, "Give either 'prompt' (a string) or 'messages' (a list).")
            return
        await ex.send_json(
            200,
            {
                "count": len(tokens),
                "max_model_len": model.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            },
        )

    async def _chat(self, req: _Request, ex: _Exchange) -> None:
        import asyncio

        started = time.monotonic()
        settings = self._settings
        body = req.json
        if not isinstance(body, dict):
            await ex.send_error(400, "The request body must be a JSON object.")
            return
        if not self.ready:
            await ex.send_error(503, "The model is loading; try again later.")
            return
        model, name = self._lookup_model(body)
        if model is None:
            await ex.send_error(404, f"The model `{name}` does not exist.")
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            await ex.send_error(400, "'messages' must be a non-empty list.")
            return
        prompt_tokens = count_prompt_tokens(messages)
        if prompt_tokens > model.max_model_len:
            await ex.send_error(
                400,
                f"This model's maximum context length is {model.max_model_len} tokens. "
                f"However, you requested {prompt_tokens} tokens in the messages. "
                "Please reduce the length of the messages.",
            )
            return
        plan = _plan_reply(body, model, settings)
        stream = body.get("stream") is True
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
        latency = model.latency if model.latency is not None else settings.latency
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + plan.completion_tokens,
            "completion_tokens": plan.completion_tokens,
            "prompt_tokens_details": None,
        }
        completion_id = f"chatcmpl-{os.urandom(16).hex()}"
        created = int(time.time())

        mm = self._model_metrics(model.id)
        await self._acquire_slot(mm)
        first_token_at: float | None = None
        finish = "abort"
        try:
            if not stream:
                if latency > 0:
                    await asyncio.sleep(latency)
                response = _completion_json(completion_id, created, model.id, plan, usage)
                first_token_at = time.monotonic()
                await ex.send_json(200, response)
                finish = plan.finish_reason
                return

            await ex.start_stream()
            if latency > 0:
                await asyncio.sleep(latency)
            extra: dict[str, Any] = {"usage": None} if include_usage else {}

            def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
                return _dumps(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model.id,
                        "choices": [
                            {
                                "index": 0,
                                "delta": delta,
                                "logprobs": None,
                                "finish_reason": finish_reason,
                            }
                        ],
                        **extra,
                    }
                )

            deltas = _stream_deltas(plan)
            token_delay = settings.token_delay
            for i, delta in enumerate(deltas):
                if i > 1 and token_delay > 0:
                    await asyncio.sleep(token_delay)
                await ex.send_event(chunk(delta))
                if first_token_at is None and i >= 1:
                    first_token_at = time.monotonic()
            if token_delay > 0 and len(deltas) > 1:
                await asyncio.sleep(token_delay)
            await ex.send_event(chunk({}, plan.finish_reason))
            if first_token_at is None:
                first_token_at = time.monotonic()
            if include_usage:
                await ex.send_event(
                    _dumps(
                        {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model.id,
                            "choices": [],
                            "usage": usage,
                        }
                    )
                )
            await ex.send_event(b"[DONE]")
            await ex.end_stream()
            finish = plan.finish_reason
        finally:
            self._release_slot(mm)
            ended = time.monotonic()
            with self._lock:
                mm.finished[finish] = mm.finished.get(finish, 0) + 1
                mm.prompt_tokens += prompt_tokens
                mm.request_prompt.observe(prompt_tokens)
                mm.e2e.observe(ended - started)
                if first_token_at is not None:
                    mm.ttft.observe(first_token_at - started)
                    mm.generation_tokens += plan.completion_tokens
                    mm.request_gen.observe(plan.completion_tokens)
                    if plan.completion_tokens > 1:
                        mm.tpot.observe((ended - first_token_at) / (plan.completion_tokens - 1))

    # -- internals: admin ------------------------------------------------------

    def _admin(self, req: _Request) -> tuple[int, Any]:
        """Handle ``/_admin/*``; returns (status, JSON payload)."""
        route = (req.method, req.path)
        body = req.json if req.body else {}
        try:
            if route == ("GET", "/_admin/config"):
                return 200, {"settings": self._settings.to_dict()}
            if route == ("POST", "/_admin/config"):
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object of settings")
                return 200, {"settings": self.configure(**body).to_dict()}
            if route == ("GET", "/_admin/fault"):
                return 200, {"faults": [f.to_dict() for f in self.faults]}
            if route == ("POST", "/_admin/fault"):
                items = body.get("faults", [body]) if isinstance(body, dict) else body
                if not isinstance(items, list):
                    raise ValueError("expected a fault object, a list, or {'faults': [...]}")
                faults = [Fault.from_dict(item) for item in items]
                with self._lock:
                    self._faults.extend(faults)
                return 200, {"queued": len(faults), "faults": [f.to_dict() for f in self.faults]}
            if route == ("DELETE", "/_admin/fault"):
                self.clear_faults()
                return 200, {"faults": []}
            if route == ("GET", "/_admin/stats"):
                counts = {f"{m} {p}": n for (m, p), n in self.stats().items()}
                return 200, {
                    "counts": counts,
                    "total": sum(counts.values()),
                    "in_flight": self.in_flight,
                    "ready": self.ready,
                }
            if route == ("GET", "/_admin/requests"):
                return 200, {"requests": [r.to_dict() for r in self.requests]}
            if route == ("POST", "/_admin/ready"):
                ready = body.get("ready") if isinstance(body, dict) else body
                if ready is not None and not isinstance(ready, bool):
                    raise ValueError("'ready' must be true, false or null")
                self.set_ready(ready)
                return 200, {"ready": self.ready}
            if route == ("POST", "/_admin/reset"):
                self.reset()
                return 200, {"reset": True}
        except (TypeError, ValueError, KeyError) as exc:
            return 400, _error_body(400, str(exc))
        return 404, {"detail": "Not Found"}


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connecting is refused)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --------------------------------------------------------------------------
# Driving a server in another process
# --------------------------------------------------------------------------


class RemoteNimServer:
    """Drives a server in another process through its admin endpoints.

    Offers the control methods of :class:`NimServer` (``configure``,
    ``inject``, ``clear_faults``, ``set_ready``, ``stats``, ``count``,
    ``requests``, ``reset``) for the server at ``root_url``
    (``http://127.0.0.1:PORT``).
    """

    def __init__(self, root_url: str, *, timeout: float = 10.0) -> None:
        self.root_url = root_url.rstrip("/")
        self.timeout = timeout

    @property
    def port(self) -> int:
        """The TCP port of ``root_url``."""
        return int(self.root_url.rsplit(":", 1)[1])

    @property
    def base_url(self) -> str:
        """``ROOT/v1``, the OpenAI-compatible base URL."""
        return f"{self.root_url}/v1"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(
            f"{self.root_url}{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            exc.close()
            raise ValueError(f"{method} {path} failed with {exc.code}: {detail}") from None

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings; returns the new settings as a dict."""
        return dict(self._call("POST", "/_admin/config", settings)["settings"])

    def inject(
        self,
        kind: str,
        count: int | None = 1,
        path: str | None = _CHAT_PATH,
        *,
        model: str | None = None,
        **params: Any,
    ) -> Fault:
        """Queue a fault (see :meth:`NimServer.inject`)."""
        fault = Fault(kind=kind, count=count, path=path, model=model, params=params)
        self._call("POST", "/_admin/fault", fault.to_dict())
        return fault

    def clear_faults(self) -> None:
        """Drop every queued and permanent fault."""
        self._call("DELETE", "/_admin/fault")

    def set_ready(self, ready: bool | None) -> None:
        """Force readiness (True/False) or restore the loading clock (None)."""
        self._call("POST", "/_admin/ready", {"ready": ready})

    def stats(self) -> dict[tuple[str, str], int]:
        """Number of requests received per ``(method, path)``."""
        counts = self._call("GET", "/_admin/stats")["counts"]
        result: dict[tuple[str, str], int] = {}
        for key, n in counts.items():
            method, _, path = key.partition(" ")
            result[(method, path)] = int(n)
        return result

    def count(self, path: str = _CHAT_PATH, method: str | None = None) -> int:
        """Number of requests received for ``path`` (with any method unless ``method``)."""
        return sum(
            n for (m, p), n in self.stats().items() if p == path and (method is None or m == method)
        )

    @property
    def requests(self) -> list[RecordedRequest]:
        """The recorded requests, oldest first."""
        items = self._call("GET", "/_admin/requests")["requests"]
        return [RecordedRequest.from_dict(item) for item in items]

    def reset(self) -> None:
        """Restore start-up settings and clear faults, records, counts and metrics."""
        self._call("POST", "/_admin/reset", {})


class NimServerProcess(RemoteNimServer):
    """Runs ``python -m nimpipe.testing.nim_server`` as a child process.

    Takes ``port`` (0: a free one) and the fields of :class:`NimSettings` as
    keywords.  :meth:`start` returns once the child prints its ``READY`` line;
    :meth:`stop` sends SIGTERM (then SIGKILL after ``timeout``).  Use it as a
    context manager.  The child's stderr goes to this process's stderr.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        python: str | None = None,
        startup_timeout: float = 15.0,
        **settings: Any,
    ) -> None:
        NimSettings().evolve(**settings)  # fail early on unknown settings
        super().__init__("http://127.0.0.1:0")
        self._port = port
        self._python = python or sys.executable
        self._startup_timeout = startup_timeout
        self._settings = settings
        self.process: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        """Process id of the running child."""
        if self.process is None:
            raise RuntimeError("the server process has not been started")
        return self.process.pid

    def start(self) -> NimServerProcess:
        """Start the child and wait for its READY line."""
        import selectors
        import subprocess

        command = [
            self._python,
            "-m",
            "nimpipe.testing.nim_server",
            "--port",
            str(self._port),
            "--config",
            json.dumps(self._settings),
        ]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.process = process
        assert process.stdout is not None
        deadline = time.monotonic() + self._startup_timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.stop()
                    raise RuntimeError("the NIM test server process did not become ready")
                line = process.stdout.readline()
                if line.startswith("READY "):
                    break
                if not line:
                    code = process.wait()
                    self.stop()
                    raise RuntimeError(f"the NIM test server process exited with code {code}")
        base_url = line.split(" ", 1)[1].strip()
        self.root_url = base_url.removesuffix("/v1")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL) and wait for it."""
        import subprocess

        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        self.process = None

    def __enter__(self) -> NimServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Serve in this process until SIGTERM/SIGINT; ``python -m nimpipe.testing.nim_server``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nimpipe.testing.nim_server",
        description="Serve a NIM-shaped test API on 127.0.0.1; print 'READY <base url>' "
        "once listening.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", action="append", help="served model id; repeat for several")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--latency", type=float, help="seconds before each reply")
    parser.add_argument("--token-delay", type=float, help="seconds between stream chunks")
    parser.add_argument("--ready-after", type=float, help="seconds of 'loading' after start")
    parser.add_argument("--reply", help="fixed reply text")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--metrics-prefix", help="'vllm:' for vLLM metric names")
    parser.add_argument("--config", help="JSON object of settings (applied before the flags)")
    args = parser.parse_args(argv)

    settings: dict[str, Any] = json.loads(args.config) if args.config else {}
    if args.model:
        if len(args.model) == 1:
            settings["model"] = args.model[0]
        else:
            settings["models"] = list(args.model)
    for flag in (
        "max_model_len",
        "latency",
        "token_delay",
        "ready_after",
        "reply",
        "api_key",
        "metrics_prefix",
    ):
        value = getattr(args, flag)
        if value is not None:
            settings[flag] = value
    try:
        server = NimServer(host=args.host, port=args.port, **settings)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    server.serve_forever(
        on_ready=lambda srv: print(f"READY {srv.base_url}", flush=True), handle_signals=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
