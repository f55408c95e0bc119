"""Faults a NIM test server can be told to inject, and how each one answers.

A :class:`Fault` is queued with :meth:`NimServer.inject` (or ``POST
/_admin/fault``) and taken by the next matching request.  Faults that replace
the answer are answered here (:func:`answer_fault`); ``cut_stream`` and
``stall`` with ``after_chunks`` shape the normal answer as it is written
(see :class:`~nimpipe.testing.nim_server.exchange.Exchange`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from nimpipe.testing.nim_server.replies import dumps
from nimpipe.testing.nim_server.settings import CHAT_PATH

if TYPE_CHECKING:
    from aiohttp import web

    from nimpipe.testing.nim_server.exchange import Exchange

__all__ = ["FAULT_KINDS", "Fault", "answer_fault", "take_fault"]

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

_TRUNCATED_JSON = '{"id": "chatcmpl-malformed", "object": "chat.compl'


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
    path: str | None = CHAT_PATH
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

    def param(self, kind: str, name: str, default: Any) -> Any:
        """Parameter ``name`` (or ``default``) when this fault is a ``kind``; else ``None``."""
        if self.kind != kind:
            return None
        return self.params.get(name, default)

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
        path = data.pop("path", CHAT_PATH)
        model = data.pop("model", None)
        return cls(kind=kind, count=count, path=path, model=model, params=data)


def take_fault(queue: list[Fault], path: str, model: str | None) -> Fault | None:
    """Take the first fault of ``queue`` that matches, using up one of its ``count``.

    Returns a copy, so that a later change to the queue does not reach a
    request already being answered.  The caller holds the server's lock.
    """
    for i, fault in enumerate(queue):
        if fault.matches(path, model):
            taken = dataclasses.replace(fault, params=dict(fault.params))
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    del queue[i]
            return taken
    return None


async def answer_fault(fault: Fault, ex: Exchange, default_model: str) -> web.StreamResponse | None:
    """Answer a request as ``fault`` says; ``None`` when the normal answer follows.

    The normal answer follows a ``delay`` (after it), a ``cut_stream`` and a
    ``stall`` with ``after_chunks`` on a streaming request (both shape the
    answer as it is written).  Every answer given here closes the connection.
    """
    import asyncio

    params = fault.params
    kind = fault.kind
    if kind == "delay":
        await asyncio.sleep(float(params.get("seconds", 1.0)))
        return None
    if kind == "cut_stream":
        return None
    if kind == "drop":
        return ex.hang_up()
    if kind == "stall":
        if params.get("after_chunks") is not None and ex.incoming.wants_stream:
            return None
        return await ex.stall()
    ex.keep_alive = False
    if kind == "status":
        status = int(params.get("status", 500))
        headers = list(dict(params.get("headers") or {}).items())
        body = params.get("body")
        if body is None:
            message = params.get("message") or f"{_reason(status)} (injected)"
            return await ex.send_error(status, message, headers=headers)
        if isinstance(body, str):
            return await ex.send(status, body.encode("utf-8"), headers=headers)
        return await ex.send_json(status, body, headers=headers)
    if kind == "rate_limit":
        retry_after = params.get("retry_after", 1)
        message = params.get("message") or f"Rate limit exceeded; retry after {retry_after} s."
        return await ex.send_error(429, message, headers=[("retry-after", str(retry_after))])
    if kind == "auth":
        return await ex.send_error(401, params.get("message") or "Invalid API key (injected).")
    return await _answer_malformed(ex, kind, params, default_model)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _answer_malformed(
    ex: Exchange, kind: str, params: Mapping[str, Any], default_model: str
) -> web.StreamResponse:
    model = ex.incoming.model or default_model
    created = int(time.time())
    stream = ex.incoming.wants_stream
    if kind == "malformed":
        payload = params.get("body") or _TRUNCATED_JSON
        data = payload.encode("utf-8") if isinstance(payload, str) else dumps(payload)
    elif stream:
        data = dumps(
            {
                "id": "chatcmpl-malformed",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
        )
    else:
        data = dumps(
            {
                "id": "chatcmpl-malformed",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )
    if not stream:
        return await ex.send(200, data)

    async def events() -> AsyncGenerator[bytes, None]:
        yield data
        yield b"[DONE]"

    return await ex.stream(events())
