"""A hostile HTTP server on 127.0.0.1 that echoes the key it is sent, everywhere it can.

One aiohttp server plays every endpoint nimpipe talks to: OpenAI-compatible
chat completions (the model route, the NemoGuard chat models, a NeMo
Guardrails server's guarded generation), NeMo Guardrails ``/v1/checks`` and
NemoGuard jailbreak ``/v1/classify``.  The first path segment chooses the
behaviour: ``{url}/401/v1`` is a route whose every answer is a 401 quoting
the key.  The key (from ``Authorization: Bearer ...`` or ``api-key``) comes
back as it is, URL-encoded and base64-encoded, in bodies, in SSE error
events and in response headers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

#: Route behaviours (paths under ``/{mode}/v1/chat/completions``).
ROUTE_MODES = (
    "ok",  # a normal answer; the key is echoed in the response headers only
    "extra",  # a normal answer with the key in its id, its model and fields beyond OpenAI's
    "400",
    "401",
    "429",
    "500",
    "500-text",  # a plain-text 500 quoting the request's Authorization header
    "401-cut",  # the key where a message is cut short (1,000 characters)
    "500-cut",  # the key where a plain-text body is cut short (300 bytes)
    "json-error",  # HTTP 200 whose body is an error object, no choices
    "sse-error",  # streamed: one token, then an error event quoting the key
    "sse-error-first",  # streamed: an error event before any token
)

#: Guardrails behaviours: (mode, backend) pairs; the backend's settings point at ``/{mode}``.
GUARD_MODES = (
    ("cs-safe", "content_safety"),  # judged safe; the key only in the response headers
    ("cs-unsafe", "content_safety"),  # the input is unsafe; the key in the categories
    ("cs-unsafe-out", "content_safety"),  # the output is unsafe; the key in the categories
    ("cs-401", "content_safety"),
    ("cs-prose", "content_safety"),  # prose instead of a JSON verdict, quoting the key
    ("topic-odd", "topic_control"),  # neither on-topic nor off-topic: the key
    ("nemo-block", "microservice"),  # /v1/checks blocks, the rail named after the key
    ("nemo-rewrite", "microservice"),  # /v1/checks rewrites the input into the key
    ("nemo-500", "microservice"),
    ("jb-401", "jailbreak"),
    ("jb-bad", "jailbreak"),  # a 200 whose "jailbreak" is the key, not a boolean
    ("gen-block", "generation"),  # guarded generation: the rails log names the key
    ("gen-401", "generation"),
)


def key_of(headers: Mapping[str, str]) -> str:
    """The key a request carried (bearer token or ``api-key``), or ``""``."""
    auth = headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("api-key", "")


def echoed(key: str, auth: str) -> str:
    """The key in every form a careless server quotes it in."""
    b64 = base64.b64encode(key.encode()).decode()
    basic = base64.b64encode(f"user:{key}".encode()).decode()
    return (
        f"Incorrect API key provided: {key} (header {auth!r}; url-encoded {quote(key, safe='')}; "
        f"base64 {b64}; basic {basic})"
    )


def echo_headers(key: str, auth: str) -> dict[str, str]:
    """Response headers that echo the key."""
    return {
        "x-echo-authorization": auth,
        "x-request-id": key,
        "x-echo-key-base64": base64.b64encode(key.encode()).decode(),
        "x-echo-key-url": quote(key, safe=""),
        "www-authenticate": f'Bearer error="invalid_token", token="{key}"',
    }


def _completion(model: str, content: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-echo",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        **extra,
    }


def _chunk(model: str, content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": content} if content is not None else {}
    return {
        "id": "chatcmpl-echo",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _error(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": kind, "param": None}}


class EchoServer:
    """The echo server on 127.0.0.1 (a free port), on its own thread; use as a context manager."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, mode: str) -> str:
        """The OpenAI-compatible base URL of one behaviour (``.../{mode}/v1``)."""
        return f"{self.url}/{mode}/v1"

    def __enter__(self) -> EchoServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="echo-server", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the echo server did not start within 30 s")
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{mode}/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        mode = request.match_info["mode"]
        tail = request.match_info["tail"]
        self.requests.append((mode, tail))
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        auth = request.headers.get("Authorization", "")
        key = key_of(request.headers)
        headers = echo_headers(key, auth)
        message = echoed(key, auth)
        if tail.endswith("checks"):
            status = 500 if mode == "nemo-500" else 200
            checked = self._checks(mode, key, message)
            return web.json_response(checked, status=status, headers=headers)
        if tail.endswith("classify"):
            if mode == "jb-401":
                return web.json_response(_error(message), status=401, headers=headers)
            return web.json_response({"jailbreak": key, "score": message}, headers=headers)
        if not tail.endswith("chat/completions"):
            return web.json_response(_error(message), status=404, headers=headers)
        model = str(body.get("model") or "echo")
        stream = bool(body.get("stream"))
        answer = self._guard_answer(mode, key, message, body, model)
        if answer is not None:
            status, data = answer
            return web.json_response(data, status=status, headers=headers)
        return await self._route_answer(request, mode, key, message, headers, model, stream)

    def _checks(self, mode: str, key: str, message: str) -> dict[str, Any]:
        if mode == "nemo-block":
            return {"status": "blocked", "rail": f"self check {key}", "content": message}
        if mode == "nemo-rewrite":
            return {"status": "modified", "rail": "mask", "content": message}
        if mode == "nemo-500":
            return _error(message, "server_error")
        return {"status": "passed", "rail": None}

    def _guard_answer(
        self, mode: str, key: str, message: str, body: Any, model: str
    ) -> tuple[int, Any] | None:
        prompt = json.dumps(body.get("messages", ""))
        output = "response: agent:" in prompt
        if mode.startswith("cs-"):
            if mode == "cs-401":
                return 401, _error(message)
            if mode == "cs-prose":
                return 200, _completion(model, f"I cannot judge this: {message}")
            unsafe_in = mode == "cs-unsafe" and not output
            unsafe_out = mode == "cs-unsafe-out" and output
            verdict: dict[str, str] = {"User Safety": "unsafe" if unsafe_in else "safe"}
            if output:
                verdict["Response Safety"] = "unsafe" if unsafe_out else "safe"
            if unsafe_in or unsafe_out:
                verdict["Safety Categories"] = f"S14: Other ({message})"
            return 200, _completion(model, json.dumps(verdict))
        if mode == "topic-odd":
            return 200, _completion(model, message)
        if mode == "gen-401":
            return 401, _error(message)
        if mode == "gen-block":
            rails = [{"type": "input", "name": f"self check {key}", "stop": True, "duration": 0.01}]
            log = {"log": {"activated_rails": rails}, "output_data": {}}
            return 200, _completion(model, "I'm sorry, I can't respond to that.", guardrails=log)
        return None

    async def _route_answer(
        self,
        request: Any,
        mode: str,
        key: str,
        message: str,
        headers: dict[str, str],
        model: str,
        stream: bool,
    ) -> Any:
        from aiohttp import web

        statuses = {"400": 400, "401": 401, "429": 429, "500": 500}
        if mode in statuses:
            status = statuses[mode]
            if status == 429:
                headers = {**headers, "retry-after": "0"}
            return web.json_response(_error(message), status=status, headers=headers)
        # The cut falls 25 characters into the key ("Incorrect API key provided: " is 28).
        if mode == "401-cut":
            padded = "x" * 946 + " " + message
            return web.json_response(_error(padded), status=401, headers=headers)
        if mode == "500-cut":
            return web.Response(text="x" * 246 + " " + message, status=500, headers=headers)
        if mode == "500-text":
            text = f"upstream failed for {request.headers.get('Authorization', '')}: {message}"
            return web.Response(text=text, status=500, headers=headers)
        if mode == "json-error":
            return web.json_response(_error(message), headers=headers)
        extra: dict[str, Any] = {}
        if mode == "extra":
            model = f"model-for-{key}"
            extra = {"id": f"chatcmpl-{key}", "system_fingerprint": key, "debug": {"auth": message}}
        if not stream:
            if mode.startswith("sse-"):
                failed = _error(message, "server_error")
                return web.json_response(failed, status=500, headers=headers)
            return web.json_response(_completion(model, "Echo reply.", **extra), headers=headers)
        response = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)

        async def event(data: Any, name: str | None = None) -> None:
            prefix = f"event: {name}\n" if name else ""
            await response.write(f"{prefix}data: {json.dumps(data)}\n\n".encode())

        if mode == "sse-error-first":
            await event(_error(message, "server_error"), "error")
            await response.write_eof()
            return response
        await event({**_chunk(model, "Echo "), **extra})
        if mode == "sse-error":
            await event(_error(message, "server_error"))
            await response.write_eof()
            return response
        await event(_chunk(model, "reply."))
        await event(_chunk(model, None, "stop"))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
