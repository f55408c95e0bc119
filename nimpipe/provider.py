"""The OpenAI-compatible provider: one model call on one route.

Hosted NIM, self-hosted NIM, llama.cpp, vLLM and Ollama are all routes of
this one provider.  It makes exactly one HTTP request per call; the pipeline
owns retries, backoff and deadlines, so that every attempt is recorded.  Every
failure comes out as a typed :class:`~nimpipe.errors.ProviderError`, and every
reply is checked before anything of it reaches a stage: a reply that is not a
valid completion (wrong types, impossible usage, a stream cut before it
finished) is a :class:`~nimpipe.errors.MalformedReplyError`, never a bare
``TypeError`` or a silently shortened answer.

Requests go straight through httpx (see :mod:`nimpipe._http`): nimpipe builds
the JSON body and reads the reply itself, in pieces, so that the turn's
deadline and the size limits hold however slowly a server answers.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import attrs

from nimpipe import __version__
from nimpipe._http import (
    MAX_ERROR_BYTES,
    MAX_REPLY_BYTES,
    Clients,
    Clock,
    SSEParser,
    aiter_body,
    deadline_of,
    iter_body,
    timeout_for,
)
from nimpipe.errors import (
    AuthenticationError,
    ContextOverflowError,
    DeadlineExceededError,
    InvalidRequestError,
    MalformedReplyError,
    OfflineError,
    ProviderError,
    RateLimitError,
    TimeoutError,
    UnavailableError,
)
from nimpipe.redaction import scrub, scrub_data
from nimpipe.types import FinishReason, Response, Route, ToolCall, Turn, Usage

__all__ = [
    "MAX_USAGE_TOKENS",
    "OpenAIProvider",
    "StreamAssembler",
    "build_request",
    "parse_completion",
    "translate_error",
]

_CHAT_PATH = "/chat/completions"

#: Fields of an OpenAI ``chat.completion``; anything else is kept in ``Response.extra``.
_COMPLETION_FIELDS = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"}
)

#: A token count above this in a reply is impossible (no model has such a context).
MAX_USAGE_TOKENS = 10**9

#: Tool calls in one reply, and the highest streamed tool-call index, accepted.
_MAX_TOOL_CALLS = 256

_CONTEXT_MARKERS = (
    "context length",
    "context_length",
    "maximum context",
    "too many tokens",
    "prompt is too long",
    "exceeds the model",
)

_USER_AGENT = f"nimpipe/{__version__}"


def build_request(route: Route, turn: Turn, *, stream: bool) -> dict[str, Any]:
    """The JSON body of a ``chat/completions`` request for ``turn`` on ``route``."""
    body: dict[str, Any] = {
        "model": turn.model or route.model,
        "messages": [m.to_openai() for m in turn.messages],
    }
    if turn.tools:
        body["tools"] = [t.to_openai() for t in turn.tools]
    if route.extra_body:
        body.update(route.extra_body)
    if route.max_output_tokens is not None:
        body["max_tokens"] = route.max_output_tokens
    if turn.params:
        body.update(turn.params)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def encode_request(body: Mapping[str, Any], route: Route) -> bytes:
    """``body`` as UTF-8 JSON; input that cannot be sent is an :class:`InvalidRequestError`."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"the request holds text that is not valid Unicode ({exc.reason} at position "
            f"{exc.start}): lone surrogates cannot be sent",
            route=route,
        ) from None
    except RecursionError:
        raise InvalidRequestError(
            "the request is nested too deeply to encode (tool schema, params or content)",
            route=route,
        ) from None
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the request is not JSON: {exc}", route=route) from None


def completion_cap(body: Mapping[str, Any]) -> int | None:
    """The completion-token cap a request asked for, if any."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _count(raw: Any, name: str, route: Route) -> int:
    value = raw.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedReplyError(f"usage.{name} is not a number: {value!r:.40}", route=route)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise MalformedReplyError(f"usage.{name} is not a whole number: {value!r}", route=route)
        value = int(value)
    if value < 0 or value > MAX_USAGE_TOKENS:
        raise MalformedReplyError(f"usage.{name} is impossible: {value}", route=route)
    return value


def usage_of(raw: Any, route: Route, cap: int | None = None) -> Usage:
    """Validated usage: impossible counts are a malformed reply; counts above ``cap`` are cut.

    A server that reports more completion tokens than the request allowed
    has either ignored the cap or miscounted; either way nimpipe charges at
    most the cap and marks the usage ``clamped``.
    """
    if raw is None:
        return Usage(source="none")
    if not isinstance(raw, Mapping):
        raise MalformedReplyError("usage is not an object", route=route)
    prompt = _count(raw, "prompt_tokens", route)
    completion = _count(raw, "completion_tokens", route)
    if cap is not None and completion > cap:
        return Usage(prompt_tokens=prompt, completion_tokens=cap, source="clamped")
    return Usage(prompt_tokens=prompt, completion_tokens=completion, source="server")


def _logprobs_of(choice: Mapping[str, Any]) -> tuple[float, ...] | None:
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, Mapping) else None
    if not content or not isinstance(content, list):
        return None
    try:
        values = tuple(float(t["logprob"]) for t in content)
    except (TypeError, ValueError, KeyError):
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _text(value: Any, what: str, route: Route) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedReplyError(f"{what} is not text: {type(value).__name__}", route=route)
    if not value.isascii():
        return _valid_unicode(value)
    return value


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (JSON ``\\ud800`` escapes) replaced by U+FFFD.

    They are not characters: printing or sending them back would fail later,
    far from the reply that carried them.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _finish(value: Any, route: Route) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise MalformedReplyError(f"finish_reason is not text: {value!r:.40}", route=route)


def parse_completion(data: Any, route: Route, latency: float, cap: int | None = None) -> Response:
    """Turn a decoded ``chat.completion`` into a :class:`Response`.

    Raises :class:`MalformedReplyError` when it is not a valid completion.
    """
    if not isinstance(data, Mapping):
        raise MalformedReplyError(f"reply is not a JSON object: {type(data).__name__}", route=route)
    choices = data.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], Mapping):
        raise MalformedReplyError("reply has no choices", route=route, body=_trim(data))
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise MalformedReplyError("reply choice has no message", route=route, body=_trim(data))
    raw_calls = message.get("tool_calls") or ()
    if not isinstance(raw_calls, (list, tuple)) or len(raw_calls) > _MAX_TOOL_CALLS:
        raise MalformedReplyError("tool_calls is not a list of calls", route=route)
    calls: list[ToolCall] = []
    for call in raw_calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise MalformedReplyError("tool call without a function name", route=route)
        calls.append(
            ToolCall(
                id=_text(call.get("id"), "tool call id", route) or f"call_{len(calls)}",
                name=_text(fn["name"], "tool call name", route),
                arguments=_text(fn.get("arguments"), "tool call arguments", route) or "{}",
            )
        )
    model = data.get("model")
    reply_id = data.get("id")
    extra = {k: v for k, v in data.items() if k not in _COMPLETION_FIELDS}
    # A server may echo the key anywhere; what it says about itself is masked.
    return Response(
        text=_text(message.get("content"), "message content", route),
        tool_calls=tuple(calls),
        finish_reason=FinishReason.parse(_finish(choice.get("finish_reason"), route)),
        usage=usage_of(data.get("usage"), route, cap),
        model=_scrubbed(model, route) if isinstance(model, str) and model else route.model,
        route=route.name,
        latency=latency,
        id=_scrubbed(reply_id, route) if isinstance(reply_id, str) else None,
        logprobs=_logprobs_of(choice),
        extra=scrub_data(extra, _known(route)) if extra else extra,
    )


def _trim(data: Any) -> str:
    return repr(data)[:500]


def _decode(raw: bytes | str, route: Route) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise MalformedReplyError("reply is nested too deeply to read", route=route) from None
    except ValueError as exc:
        snippet = raw[:120]
        if isinstance(snippet, bytes):
            snippet = snippet.decode("utf-8", "replace")
        raise MalformedReplyError(
            f"reply is not valid JSON ({exc}): {snippet!r}", route=route
        ) from None


@attrs.define
class StreamAssembler:
    """Accumulates decoded ``chat.completion.chunk`` objects into a :class:`Response`."""

    route: Route
    started: float
    cap: int | None = None
    text_parts: list[str] = attrs.field(factory=list)
    ttft: float | None = None
    finish: str | None = None
    usage: Usage = attrs.field(factory=lambda: Usage(source="none"))
    model: str = ""
    id: str | None = None
    #: Whether the server said the stream is over (``[DONE]`` or a finish reason).
    ended: bool = False
    _calls: dict[int, dict[str, str]] = attrs.field(factory=dict)

    def feed(self, chunk: Any) -> str:
        """Take one decoded chunk; return its text delta (``""`` if none)."""
        route = self.route
        if not isinstance(chunk, Mapping):
            raise MalformedReplyError("streamed chunk is not a JSON object", route=route)
        error = chunk.get("error")
        if error is not None:
            raise _stream_error_event(error, route)
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = usage_of(usage, route, self.cap)
        if not self.model:
            model = chunk.get("model")
            self.model = _scrubbed(model, route) if isinstance(model, str) else ""
            chunk_id = chunk.get("id")
            self.id = _scrubbed(chunk_id, route) if isinstance(chunk_id, str) else None
        choices = chunk.get("choices")
        if not choices:
            return ""
        if not isinstance(choices, list) or not isinstance(choices[0], Mapping):
            raise MalformedReplyError("streamed choices is not a list of objects", route=route)
        choice = choices[0]
        finish = _finish(choice.get("finish_reason"), route)
        if finish:
            self.finish = finish
        delta = choice.get("delta")
        if delta is None:
            return ""
        if not isinstance(delta, Mapping):
            raise MalformedReplyError("streamed delta is not an object", route=route)
        calls = delta.get("tool_calls")
        if calls:
            self._feed_calls(calls)
        text = _text(delta.get("content"), "streamed content", route)
        if text:
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.started
            self.text_parts.append(text)
        return text

    def _feed_calls(self, calls: Any) -> None:
        route = self.route
        if not isinstance(calls, list):
            raise MalformedReplyError("streamed tool_calls is not a list", route=route)
        for call in calls:
            if not isinstance(call, Mapping):
                raise MalformedReplyError("streamed tool call is not an object", route=route)
            index = call.get("index", 0)
            if index is None:
                index = 0
            if isinstance(index, bool) or not isinstance(index, int):
                raise MalformedReplyError(
                    f"streamed tool-call index is not an integer: {index!r:.40}", route=route
                )
            if not 0 <= index < _MAX_TOOL_CALLS:
                raise MalformedReplyError(f"streamed tool-call index {index}", route=route)
            slot = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            call_id = _text(call.get("id"), "tool call id", route)
            if call_id:
                slot["id"] = call_id
            fn = call.get("function")
            if fn is not None:
                if not isinstance(fn, Mapping):
                    raise MalformedReplyError(
                        "streamed tool function is not an object", route=route
                    )
                slot["name"] += _text(fn.get("name"), "tool call name", route)
                slot["arguments"] += _text(fn.get("arguments"), "tool call arguments", route)
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.started

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def received(self) -> bool:
        """Whether any text or tool call arrived."""
        return bool(self.text_parts or self._calls)

    def response(self) -> Response:
        """The complete response.

        Raises :class:`MalformedReplyError` if the stream carried no choice at
        all, and :class:`UnavailableError` if it ended before the server said
        it was done (a cut stream is never a complete answer).
        """
        if self.finish is None:
            if not self.received:
                raise MalformedReplyError("stream ended without any choice", route=self.route)
            # Without a finish reason the answer is not known to be whole, even
            # after [DONE] (llama.cpp's server sends it when a stream is interrupted).
            raise UnavailableError(
                f"stream cut after {len(self.text)} characters: it ended without a finish reason",
                route=self.route,
            )
        calls: list[ToolCall] = []
        for index in sorted(self._calls):
            slot = self._calls[index]
            if not slot["name"]:
                raise MalformedReplyError("streamed tool call without a name", route=self.route)
            calls.append(
                ToolCall(
                    id=slot["id"] or f"call_{index}",
                    name=slot["name"],
                    arguments=slot["arguments"] or "{}",
                )
            )
        return Response(
            text=self.text,
            tool_calls=tuple(calls),
            finish_reason=FinishReason.parse(self.finish),
            usage=self.usage,
            model=self.model or self.route.model,
            route=self.route.name,
            latency=time.perf_counter() - self.started,
            ttft=self.ttft,
            id=self.id,
        )


def _stream_error_event(error: Any, route: Route) -> ProviderError:
    """An ``{"error": ...}`` event inside a stream, as a typed error."""
    if isinstance(error, Mapping):
        message = str(error.get("message") or error.get("type") or error.get("code") or error)
        code = error.get("code")
    else:
        message, code = str(error), None
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    if status == 429:
        return RateLimitError(f"stream error: {message}", route=route, status_code=status)
    if status is not None and status >= 500:
        return UnavailableError(f"stream error: {message}", route=route, status_code=status)
    return ProviderError(f"stream error: {message}", route=route, status_code=status)


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``Retry-After`` (or ``retry-after-ms``); unusable values are ignored."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        value = headers.get("retry-after")
    except Exception:
        return None
    seconds: float | None = None
    if ms:
        try:
            seconds = float(ms) / 1000
        except ValueError:
            seconds = None
    if seconds is None and value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - time.time()
            except (TypeError, ValueError, OverflowError):
                return None
    if seconds is None or math.isnan(seconds):
        return None
    # ``inf`` stays: the pipeline caps every wait by ``max_retry_wait``.
    return max(0.0, seconds)


def _error_message(body: bytes, fallback: str, route: Route) -> str:
    """The message of an error reply, masked before it is cut short."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        text = _scrubbed(body.decode("utf-8", "replace"), route)[:300].strip()
        return text or fallback
    if isinstance(data, Mapping):
        inner = data.get("error", data)
        if isinstance(inner, Mapping) and inner.get("message"):
            return _scrubbed(str(inner["message"]), route)[:1000]
        if isinstance(inner, str):
            return _scrubbed(inner, route)[:1000]
    return fallback


def status_error(status: int, body: bytes, headers: Any, route: Route) -> ProviderError:
    """A typed error for an HTTP error reply."""
    message = _error_message(body, f"HTTP {status}", route)
    kwargs: dict[str, Any] = {"route": route, "status_code": status}
    if status in (401, 403):
        hint = f"; set ${route.api_key_env}" if route.api_key_env else ""
        return AuthenticationError(f"HTTP {status}: {message}{hint}", **kwargs)
    if status == 429:
        return RateLimitError(f"HTTP 429: {message}", retry_after=_retry_after(headers), **kwargs)
    if status == 413 or (
        status in (400, 422) and any(m in message.lower() for m in _CONTEXT_MARKERS)
    ):
        return ContextOverflowError(f"HTTP {status}: {message}", **kwargs)
    if status >= 500 or status in (408, 409):
        return UnavailableError(
            f"HTTP {status}: {message}", retry_after=_retry_after(headers), **kwargs
        )
    return ProviderError(f"HTTP {status}: {message}", **kwargs)


def translate_error(exc: BaseException, route: Route) -> ProviderError:
    """Map an exception from the transport to a typed :class:`ProviderError`.

    The result is never chained to ``exc``: transport exceptions can quote
    what the server sent, and a server may echo the key it refused.
    """
    if isinstance(exc, (ProviderError, DeadlineExceededError)):
        raise exc
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OfflineError):
            raise cause  # offline refusals are not endpoint failures: never retried
        cause = cause.__cause__ or cause.__context__
    import httpx

    name = type(exc).__name__
    detail = _scrubbed(f"{name}: {exc}", route)
    if isinstance(exc, httpx.ConnectTimeout):
        return UnavailableError(f"cannot reach {route.host}: connect timed out", route=route)
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(f"no answer within the timeout ({name})", route=route)
    if isinstance(exc, httpx.ConnectError):
        return UnavailableError(f"cannot reach {route.host}: {detail}", route=route)
    if isinstance(exc, (httpx.TransportError, OSError)):
        return UnavailableError(f"connection to {route.host} lost: {detail}", route=route)
    if isinstance(exc, httpx.DecodingError):
        return MalformedReplyError(f"reply cannot be decoded: {detail}", route=route)
    raise exc


def _known(route: Route) -> list[str]:
    return [route.api_key.reveal()] if route.api_key else []


def _scrubbed(text: str, route: Route) -> str:
    return scrub(text, _known(route))


def _headers(route: Route, stream: bool) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "accept": "text/event-stream" if stream else "application/json",
        "user-agent": _USER_AGENT,
    }
    headers.update(route.headers)
    if route.api_key is not None:
        headers["authorization"] = f"Bearer {route.api_key.reveal()}"
    return headers


def _url(route: Route) -> str:
    return route.base_url.rstrip("/") + _CHAT_PATH


def _is_json(response: Any) -> bool:
    return "json" in response.headers.get("content-type", "")


class _Call:
    """One request's inputs: the encoded body, the cap and the clock."""

    __slots__ = ("cap", "clock", "headers", "payload", "route", "url")

    def __init__(self, route: Route, turn: Turn, timeout: float, stream: bool) -> None:
        body = build_request(route, turn, stream=stream)
        self.route = route
        self.cap = completion_cap(body)
        self.payload = encode_request(body, route)
        self.headers = _headers(route, stream)
        self.url = _url(route)
        self.clock = Clock(timeout, turn.remaining(), turn.id)


@attrs.define
class OpenAIProvider:
    """Makes model calls over pooled httpx clients; safe to share between threads and tasks."""

    _clients: Clients = attrs.field(factory=Clients, init=False)

    # ------------------------------------------------------------------
    # blocking
    # ------------------------------------------------------------------

    def complete(self, route: Route, turn: Turn, timeout: float) -> Response:
        """One non-streamed call."""
        # The client is built (once) before the clock starts: its cost is not the call's.
        client = self._clients.sync()
        call = _Call(route, turn, timeout, stream=False)
        started = time.perf_counter()
        try:
            with _sent(client, call) as reply:
                if reply.status_code >= 400:
                    raise self._status(reply, call, b"".join(self._read(reply, call, True)))
                raw = b"".join(self._read(reply, call, False))
        except Exception as exc:
            raise translate_error(exc, route) from None
        data = _decode(raw, route)
        return parse_completion(data, route, time.perf_counter() - started, call.cap)

    def stream(self, route: Route, turn: Turn, timeout: float) -> Iterator[str | Response]:
        """One streamed call: yields text deltas, then the complete :class:`Response`.

        Closing the iterator closes the HTTP response (that is how a call is
        cancelled).
        """
        # The client is built (once) before the clock starts: its cost is not the call's.
        client = self._clients.sync()
        call = _Call(route, turn, timeout, stream=True)
        asm = StreamAssembler(route, time.perf_counter(), call.cap)
        try:
            with _sent(client, call) as reply:
                if reply.status_code >= 400:
                    raise self._status(reply, call, b"".join(self._read(reply, call, True)))
                if _is_json(reply):
                    text = self._whole(b"".join(self._read(reply, call, False)), call, asm)
                    if text:
                        yield text
                else:
                    sse = SSEParser(route)
                    for piece in self._read(reply, call, False):
                        for event in sse.feed(piece):
                            text = self._event(event, call, asm)
                            if text:
                                yield text
                        if asm.ended:
                            break
                    for event in sse.close():
                        text = self._event(event, call, asm)
                        if text:
                            yield text
        except GeneratorExit:
            raise
        except Exception as exc:
            raise _cut(exc, route, asm) from None
        yield asm.response()

    @staticmethod
    def _read(reply: Any, call: _Call, error: bool) -> Iterator[bytes]:
        limit = MAX_ERROR_BYTES if error else MAX_REPLY_BYTES
        return iter_body(reply, call.clock, call.route, limit)

    # ------------------------------------------------------------------
    # async
    # ------------------------------------------------------------------

    async def acomplete(self, route: Route, turn: Turn, timeout: float) -> Response:
        """One non-streamed call, async."""
        # The client is built (once) before the clock starts: its cost is not the call's.
        client = await self._clients.for_loop()
        call = _Call(route, turn, timeout, stream=False)
        started = time.perf_counter()
        try:
            async with _opened(client, call) as reply:
                if reply.status_code >= 400:
                    raise self._status(reply, call, await self._aread(reply, call, True))
                raw = await self._aread(reply, call, False)
        except Exception as exc:
            raise translate_error(exc, route) from None
        data = _decode(raw, route)
        return parse_completion(data, route, time.perf_counter() - started, call.cap)

    async def astream(
        self, route: Route, turn: Turn, timeout: float
    ) -> AsyncIterator[str | Response]:
        """One streamed call, async: yields text deltas, then the :class:`Response`."""
        # The client is built (once) before the clock starts: its cost is not the call's.
        client = await self._clients.for_loop()
        call = _Call(route, turn, timeout, stream=True)
        asm = StreamAssembler(route, time.perf_counter(), call.cap)
        try:
            async with _opened(client, call) as reply:
                if reply.status_code >= 400:
                    raise self._status(reply, call, await self._aread(reply, call, True))
                if _is_json(reply):
                    text = self._whole(await self._aread(reply, call, False), call, asm)
                    if text:
                        yield text
                else:
                    sse = SSEParser(route)
                    async for piece in aiter_body(reply, call.clock, route, MAX_REPLY_BYTES):
                        for event in sse.feed(piece):
                            text = self._event(event, call, asm)
                            if text:
                                yield text
                        if asm.ended:
                            break
                    for event in sse.close():
                        text = self._event(event, call, asm)
                        if text:
                            yield text
        except GeneratorExit:
            raise
        except Exception as exc:
            raise _cut(exc, route, asm) from None
        yield asm.response()

    @staticmethod
    async def _aread(reply: Any, call: _Call, error: bool) -> bytes:
        limit = MAX_ERROR_BYTES if error else MAX_REPLY_BYTES
        return b"".join([p async for p in aiter_body(reply, call.clock, call.route, limit)])

    # ------------------------------------------------------------------
    # shared
    # ------------------------------------------------------------------

    @staticmethod
    def _status(reply: Any, call: _Call, body: bytes) -> ProviderError:
        return status_error(reply.status_code, body, reply.headers, call.route)

    @staticmethod
    def _event(event: str, call: _Call, asm: StreamAssembler) -> str:
        if asm.ended:
            return ""
        if event == "[DONE]":
            asm.ended = True
            return ""
        call.clock.progress()
        return asm.feed(_decode(event, call.route))

    @staticmethod
    def _whole(raw: bytes, call: _Call, asm: StreamAssembler) -> str:
        """A streamed request answered with one JSON completion: take it as the whole stream."""
        response = parse_completion(_decode(raw, call.route), call.route, 0.0, call.cap)
        asm.ended = True
        asm.finish = response.finish_reason.value
        asm.text_parts = [response.text] if response.text else []
        asm.usage = response.usage
        for index, tc in enumerate(response.tool_calls):
            asm._calls[index] = {"id": tc.id, "name": tc.name, "arguments": tc.arguments}
        if response.text and asm.ttft is None:
            asm.ttft = time.perf_counter() - asm.started
        return response.text

    def close(self) -> None:
        """Close the blocking client (async clients close with their event loop)."""
        self._clients.close()


@contextlib.contextmanager
def _sent(client: Any, call: _Call) -> Iterator[Any]:
    """The reply's head, within the turn's deadline however slowly it arrives (blocking)."""
    request = client.build_request(
        "POST",
        call.url,
        content=call.payload,
        headers=call.headers,
        timeout=timeout_for(call.route, call.clock),
    )
    clock = call.clock
    try:
        with deadline_of(clock.head_deadline()):
            reply = client.send(request, stream=True)
    except Exception as exc:
        import httpx

        if clock.deadline_passed():
            raise clock.deadline_error() from None
        if isinstance(exc, httpx.ReadTimeout):
            raise TimeoutError(
                f"the reply's head did not arrive within {clock.idle:g} s", route=call.route
            ) from None
        raise
    try:
        yield reply
    finally:
        reply.close()


@contextlib.asynccontextmanager
async def _opened(client: Any, call: _Call) -> AsyncIterator[Any]:
    """The reply's head, within the turn's deadline however slowly it arrives."""
    import asyncio

    request = client.build_request(
        "POST",
        call.url,
        content=call.payload,
        headers=call.headers,
        timeout=timeout_for(call.route, call.clock),
    )
    clock = call.clock
    sending = client.send(request, stream=True)
    try:
        reply = await asyncio.wait_for(
            sending, max(clock.head_deadline() - time.monotonic(), 0.001)
        )
    except asyncio.TimeoutError:
        if clock.deadline_passed():
            raise clock.deadline_error() from None
        raise TimeoutError(
            f"the reply's head did not arrive within {clock.idle:g} s", route=call.route
        ) from None
    try:
        yield reply
    finally:
        await reply.aclose()


def _cut(exc: BaseException, route: Route, asm: StreamAssembler) -> BaseException:
    """The typed error for a stream that failed, saying how much had arrived."""
    try:
        error: BaseException = translate_error(exc, route)
    except (ProviderError, DeadlineExceededError, OfflineError) as typed:
        error = typed
    if isinstance(error, ProviderError) and asm.received and "stream cut" not in error.message:
        error = type(error)(
            f"stream cut after {len(asm.text)} characters: {error.message}",
            route=route,
            status_code=error.status_code,
            retry_after=error.retry_after,
            body=error.body,
        )
    return error
