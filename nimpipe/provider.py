"""The OpenAI-compatible provider: one model call on one route.

Hosted NIM, self-hosted NIM, llama.cpp, vLLM and Ollama are all routes of
this one provider.  It makes exactly one HTTP request per call (the openai
SDK's own retries are off); the pipeline owns retries, backoff and deadlines,
so that every attempt is recorded.  Every failure comes out as a typed
:class:`~nimpipe.errors.ProviderError`.

The openai SDK (2.x or 3.x) is imported on first use, never at import time.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.errors import (
    AuthenticationError,
    ContextOverflowError,
    MalformedReplyError,
    OfflineError,
    ProviderError,
    RateLimitError,
    TimeoutError,
    UnavailableError,
)
from nimpipe.types import FinishReason, Response, Route, ToolCall, Turn, Usage

if TYPE_CHECKING:
    import asyncio

__all__ = [
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

#: Placeholder key for endpoints that need none (the SDK insists on one).
_NO_KEY = "no-key"

_CONTEXT_MARKERS = (
    "context length",
    "context_length",
    "maximum context",
    "too many tokens",
    "prompt is too long",
    "exceeds the model",
)


def build_request(route: Route, turn: Turn, *, stream: bool) -> dict[str, Any]:
    """The keyword arguments of ``chat.completions.create`` for ``turn`` on ``route``."""
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


def _field(obj: Any, name: str) -> Any:
    """``obj[name]`` for JSON mappings, ``obj.name`` for SDK objects."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _usage_of(raw: Any) -> Usage:
    if raw is None:
        return Usage(source="none")
    try:
        prompt = int(_field(raw, "prompt_tokens") or 0)
        completion = int(_field(raw, "completion_tokens") or 0)
    except (TypeError, ValueError):
        return Usage(source="none")
    return Usage(prompt_tokens=prompt, completion_tokens=completion, source="server")


def _logprobs_of(choice: Any) -> tuple[float, ...] | None:
    lp = _field(choice, "logprobs")
    content = _field(lp, "content") if lp is not None else None
    if not content:
        return None
    try:
        return tuple(float(_field(t, "logprob")) for t in content)
    except (TypeError, ValueError):
        return None


def parse_completion(data: Any, route: Route, latency: float) -> Response:
    """Turn a ``chat.completion`` (decoded JSON, or an SDK object) into a :class:`Response`.

    Raises :class:`MalformedReplyError` when it has no usable choice.
    """
    if not isinstance(data, Mapping) and hasattr(data, "model_dump"):
        data = data.model_dump()
    if not isinstance(data, Mapping):
        raise MalformedReplyError(f"reply is not a JSON object: {type(data).__name__}", route=route)
    choices = data.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], Mapping):
        raise MalformedReplyError("reply has no choices", route=route, body=_trim(data))
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise MalformedReplyError("reply choice has no message", route=route, body=_trim(data))
    calls: list[ToolCall] = []
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise MalformedReplyError("tool call without a function name", route=route)
        calls.append(
            ToolCall(
                id=call.get("id") or f"call_{len(calls)}",
                name=fn["name"],
                arguments=fn.get("arguments") or "{}",
            )
        )
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedReplyError("message content is not text", route=route)
    return Response(
        text=content or "",
        tool_calls=tuple(calls),
        finish_reason=FinishReason.parse(choice.get("finish_reason")),
        usage=_usage_of(data.get("usage")),
        model=data.get("model") or route.model,
        route=route.name,
        latency=latency,
        id=data.get("id"),
        logprobs=_logprobs_of(choice),
        extra={k: v for k, v in data.items() if k not in _COMPLETION_FIELDS},
    )


def _trim(data: Any) -> str:
    return repr(data)[:500]


def _decode(raw: bytes, route: Route) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        snippet = raw[:120].decode("utf-8", "replace")
        raise MalformedReplyError(
            f"reply is not valid JSON ({exc}): {snippet!r}", route=route
        ) from exc


@attrs.define
class StreamAssembler:
    """Accumulates ``chat.completion.chunk`` objects into a :class:`Response`."""

    route: Route
    started: float
    text_parts: list[str] = attrs.field(factory=list)
    ttft: float | None = None
    finish: str | None = None
    usage: Usage = attrs.field(factory=lambda: Usage(source="none"))
    model: str = ""
    id: str | None = None
    _calls: dict[int, dict[str, str]] = attrs.field(factory=dict)

    def feed(self, chunk: Any) -> str:
        """Take one chunk; return its text delta (``""`` if none)."""
        if getattr(chunk, "usage", None) is not None:
            self.usage = _usage_of(chunk.usage)
        if not self.model:
            self.model = getattr(chunk, "model", None) or ""
            self.id = getattr(chunk, "id", None)
        choices = getattr(chunk, "choices", None) or ()
        if not choices:
            return ""
        choice = choices[0]
        if getattr(choice, "finish_reason", None):
            self.finish = choice.finish_reason
        delta = getattr(choice, "delta", None)
        if delta is None:
            return ""
        for call in getattr(delta, "tool_calls", None) or ():
            slot = self._calls.setdefault(
                getattr(call, "index", 0) or 0, {"id": "", "name": "", "arguments": ""}
            )
            if getattr(call, "id", None):
                slot["id"] = call.id
            fn = getattr(call, "function", None)
            if fn is not None:
                if getattr(fn, "name", None):
                    slot["name"] += fn.name
                if getattr(fn, "arguments", None):
                    slot["arguments"] += fn.arguments
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.started
        text = getattr(delta, "content", None) or ""
        if text:
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.started
            self.text_parts.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def response(self) -> Response:
        """The complete response.

        Raises :class:`MalformedReplyError` if the stream carried no choice at all.
        """
        if self.finish is None and not self.text_parts and not self._calls:
            raise MalformedReplyError("stream ended without any choice", route=self.route)
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


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
    except Exception:
        return None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(exc, "message", None) or exc)


def translate_error(exc: BaseException, route: Route) -> ProviderError:
    """Map an exception from the SDK or the transport to a typed :class:`ProviderError`."""
    if isinstance(exc, ProviderError):
        return exc
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OfflineError):
            raise cause  # offline refusals are not endpoint failures: never retried
        cause = cause.__cause__ or cause.__context__
    import openai

    name = type(exc).__name__
    module = type(exc).__module__
    if isinstance(exc, openai.APITimeoutError) or (
        module.startswith(("httpx", "httpcore")) and "Timeout" in name
    ):
        return TimeoutError(f"no answer within the timeout ({name})", route=route)
    if isinstance(exc, openai.APIConnectionError) or module.startswith(
        ("httpx", "httpcore", "h11")
    ):
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {cause}" if cause else f"{name}: {exc}"
        if "Connect" in detail.split(":", 1)[0] or isinstance(cause, ConnectionRefusedError):
            return UnavailableError(f"cannot reach {route.host}: {detail}", route=route)
        return UnavailableError(f"connection to {route.host} lost: {detail}", route=route)
    if isinstance(exc, openai.APIResponseValidationError):
        return MalformedReplyError(f"reply does not match the API: {exc}", route=route)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = _error_message(exc)
        headers = getattr(exc.response, "headers", None)
        kwargs: dict[str, Any] = {"route": route, "status_code": status}
        if status in (401, 403):
            hint = f"; set ${route.api_key_env}" if route.api_key_env else ""
            return AuthenticationError(f"HTTP {status}: {message}{hint}", **kwargs)
        if status == 429:
            return RateLimitError(
                f"HTTP 429: {message}", retry_after=_retry_after(headers), **kwargs
            )
        if status == 413 or (
            status in (400, 422) and any(m in message.lower() for m in _CONTEXT_MARKERS)
        ):
            return ContextOverflowError(f"HTTP {status}: {message}", **kwargs)
        if status >= 500 or status in (408, 409):
            return UnavailableError(
                f"HTTP {status}: {message}", retry_after=_retry_after(headers), **kwargs
            )
        return ProviderError(f"HTTP {status}: {message}", **kwargs)
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError)):
        return MalformedReplyError(f"unreadable reply: {type(exc).__name__}: {exc}", route=route)
    if isinstance(exc, openai.APIError):
        return MalformedReplyError(f"unreadable reply: {_error_message(exc)}", route=route)
    if isinstance(exc, openai.OpenAIError):
        return ProviderError(str(exc), route=route)
    raise exc


@attrs.define
class OpenAIProvider:
    """Makes model calls with the openai SDK; one client per route (per event loop for async).

    Thread-safe: clients are created under a lock and the SDK's sync client is
    safe to share between threads.
    """

    _sync: dict[Route, Any] = attrs.field(factory=dict, init=False)
    _async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Route, Any]] = attrs.field(
        factory=weakref.WeakKeyDictionary, init=False
    )
    _closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = attrs.field(
        factory=weakref.WeakKeyDictionary, init=False
    )
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    @staticmethod
    def _client_kwargs(route: Route) -> dict[str, Any]:
        return {
            "base_url": route.base_url,
            "api_key": route.api_key.reveal() if route.api_key else _NO_KEY,
            "max_retries": 0,
            "timeout": route.timeout,
            "default_headers": dict(route.headers) or None,
        }

    def client(self, route: Route) -> Any:
        """The sync ``openai.OpenAI`` client of ``route``."""
        client = self._sync.get(route)
        if client is None:
            with self._lock:
                client = self._sync.get(route)
                if client is None:
                    import openai

                    client = openai.OpenAI(**self._client_kwargs(route))
                    self._sync[route] = client
        return client

    async def aclient(self, route: Route) -> Any:
        """The ``openai.AsyncOpenAI`` client of ``route`` for the running event loop.

        Clients are closed when the loop shuts down its async generators (as
        :func:`asyncio.run` does), so repeated ``asyncio.run`` calls leak no
        connections.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        clients = self._async.get(loop)
        client = clients.get(route) if clients is not None else None
        if client is not None:
            return client
        with self._lock:
            clients = self._async.get(loop)
            first = clients is None
            if clients is None:
                clients = self._async[loop] = {}
            client = clients.get(route)
            if client is None:
                import openai

                client = openai.AsyncOpenAI(**self._client_kwargs(route))
                clients[route] = client
        if first:
            closer = _close_on_shutdown(clients)
            self._closers[loop] = closer
            await closer.asend(None)
        return client

    # ------------------------------------------------------------------

    def complete(self, route: Route, turn: Turn, timeout: float) -> Response:
        """One non-streamed call.

        The request goes through the SDK's client (auth, headers, errors) as
        plain JSON: nimpipe builds the body and reads the reply itself, which
        skips the SDK's parameter transformation and response models.
        """
        body = build_request(route, turn, stream=False)
        started = time.perf_counter()
        try:
            raw = self.client(route).post(
                _CHAT_PATH, cast_to=bytes, body=body, options={"timeout": timeout}
            )
        except Exception as exc:
            raise translate_error(exc, route) from exc
        return parse_completion(_decode(raw, route), route, time.perf_counter() - started)

    async def acomplete(self, route: Route, turn: Turn, timeout: float) -> Response:
        """One non-streamed call, async."""
        body = build_request(route, turn, stream=False)
        started = time.perf_counter()
        try:
            client = await self.aclient(route)
            raw = await client.post(
                _CHAT_PATH, cast_to=bytes, body=body, options={"timeout": timeout}
            )
        except Exception as exc:
            raise translate_error(exc, route) from exc
        return parse_completion(_decode(raw, route), route, time.perf_counter() - started)

    def stream(self, route: Route, turn: Turn, timeout: float) -> Iterator[str | Response]:
        """One streamed call: yields text deltas, then the complete :class:`Response`.

        Closing the iterator closes the HTTP response (that is how a call is
        cancelled).
        """
        body = build_request(route, turn, stream=True)
        asm = StreamAssembler(route, time.perf_counter())
        try:
            stream = self.client(route).post(
                _CHAT_PATH,
                cast_to=_chunk_type(),
                body=body,
                options={"timeout": timeout},
                stream=True,
                stream_cls=_stream_type(False),
            )
            with stream:
                for chunk in stream:
                    text = asm.feed(chunk)
                    if text:
                        yield text
        except GeneratorExit:
            raise
        except Exception as exc:
            raise _stream_error(exc, route, asm) from exc
        yield asm.response()

    async def astream(
        self, route: Route, turn: Turn, timeout: float
    ) -> AsyncIterator[str | Response]:
        """One streamed call, async: yields text deltas, then the :class:`Response`."""
        body = build_request(route, turn, stream=True)
        asm = StreamAssembler(route, time.perf_counter())
        try:
            client = await self.aclient(route)
            stream = await client.post(
                _CHAT_PATH,
                cast_to=_chunk_type(),
                body=body,
                options={"timeout": timeout},
                stream=True,
                stream_cls=_stream_type(True),
            )
            async with stream:
                async for chunk in stream:
                    text = asm.feed(chunk)
                    if text:
                        yield text
        except GeneratorExit:
            raise
        except Exception as exc:
            raise _stream_error(exc, route, asm) from exc
        yield asm.response()

    def close(self) -> None:
        """Close the sync clients (async clients close with their loop)."""
        with self._lock:
            clients = list(self._sync.values())
            self._sync.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


def _chunk_type() -> Any:
    from openai.types.chat import ChatCompletionChunk

    return ChatCompletionChunk


def _stream_type(is_async: bool) -> Any:
    import openai
    from openai.types.chat import ChatCompletionChunk

    return (openai.AsyncStream if is_async else openai.Stream)[ChatCompletionChunk]


async def _close_on_shutdown(clients: dict[Route, Any]) -> AsyncGenerator[None, None]:
    """Parked for the life of an event loop; closes its clients when the loop shuts down."""
    try:
        yield
        yield
    finally:
        for client in list(clients.values()):
            with contextlib.suppress(Exception):
                await client.close()
        clients.clear()


def _stream_error(exc: BaseException, route: Route, asm: StreamAssembler) -> ProviderError:
    error = translate_error(exc, route)
    if asm.text_parts or asm._calls:
        # The stream broke after text arrived: report what was received.
        error = type(error)(
            f"stream cut after {len(asm.text)} characters: {error.message}",
            route=route,
            status_code=error.status_code,
            retry_after=error.retry_after,
            body=error.body,
        )
    return error
