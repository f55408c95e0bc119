"""The aiohttp application of a NIM test server: its routes and endpoints.

Every request but the admin ones goes through one middleware that reads the
body, records the request, takes the fault that applies to it and answers
the fault, or lets the route answer through an :class:`Exchange` that the
fault still shapes.  Unknown paths and methods get FastAPI's JSON bodies, as
from a NIM.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from nimpipe.testing.nim_server.admin import admin_answer
from nimpipe.testing.nim_server.exchange import Exchange
from nimpipe.testing.nim_server.faults import answer_fault
from nimpipe.testing.nim_server.records import Incoming
from nimpipe.testing.nim_server.replies import (
    chunk_json,
    completion_json,
    count_prompt_tokens,
    dumps,
    plan_reply,
    prompt_token_ids,
    stream_deltas,
    tokenize_messages,
)
from nimpipe.testing.nim_server.settings import CHAT_PATH
from nimpipe.testing.nim_server.state import ServerState

__all__ = ["build_app"]

#: Largest request body read (the default of aiohttp, 1 MiB, is smaller than
#: some prompts tests send).
_CLIENT_MAX_SIZE = 1 << 30

# aiohttp 3.12 and later want typed request keys; earlier versions take a string.
_EXCHANGE: Any = (
    web.RequestKey("nimpipe_exchange", Exchange)
    if hasattr(web, "RequestKey")
    else "nimpipe_exchange"
)

_LIVE = {"object": "health.response", "message": "Service is live.", "status": "live"}
_READY = {"object": "health.response", "message": "Service is ready.", "status": "ready"}
_LOADING = {
    "object": "health.response",
    "message": "Service is not ready: model is loading.",
    "status": "loading",
}


def build_app(state: ServerState) -> web.Application:
    """The application serving ``state``: NIM's endpoints and the admin API."""
    endpoints = _Endpoints(state)
    app = web.Application(middlewares=[_nim_middleware(state)], client_max_size=_CLIENT_MAX_SIZE)
    add = app.router.add_route
    add("POST", CHAT_PATH, endpoints.chat)
    for path in ("/tokenize", "/v1/tokenize"):
        add("POST", path, endpoints.tokenize)
    add("GET", "/v1/models", endpoints.list_models)
    add("GET", "/v1/models/{model_id:.*}", endpoints.model_card)
    add("GET", "/v1/health/live", endpoints.live)
    for path in ("/v1/health/ready", "/health"):
        add("GET", path, endpoints.health_ready)
    for path in ("/v1/metrics", "/metrics"):
        add("GET", path, endpoints.metrics)
    add("*", "/_admin/{name:.*}", endpoints.admin)
    return app


def _nim_middleware(state: ServerState) -> Any:
    @web.middleware
    async def nim_layer(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.raw_path.startswith("/_admin/"):
            return await handler(request)
        headers = {name.lower(): value for name, value in request.headers.items()}
        incoming = Incoming(request.method, request.raw_path, headers, await request.read())
        fault = state.record(incoming)
        ex = Exchange(request, incoming, fault)
        request[_EXCHANGE] = ex
        try:
            if fault is not None:
                answer = await answer_fault(fault, ex, next(iter(state.models)))
                if answer is not None:
                    return answer
            try:
                return await handler(request)
            except web.HTTPNotFound:
                return await ex.send_json(404, {"detail": "Not Found"})
            except web.HTTPMethodNotAllowed:
                return await ex.send_json(405, {"detail": "Method Not Allowed"})
        except ConnectionError:  # the client went away while we wrote
            return ex.hang_up()
        except Exception as exc:
            if ex.started or request.transport is None or request.transport.is_closing():
                return ex.hang_up()
            ex.fault = None
            ex.keep_alive = False
            return await ex.send_error(500, f"test server error: {type(exc).__name__}: {exc}")

    return nim_layer


class _Endpoints:
    """The route handlers; each answers through the request's :class:`Exchange`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def _refuse_without_key(self, ex: Exchange) -> web.StreamResponse | None:
        api_key = self.state.settings.api_key
        if api_key is None or ex.incoming.headers.get("authorization") == f"Bearer {api_key}":
            return None
        return await ex.send_error(401, "Unauthorized: send 'Authorization: Bearer <api key>'.")

    # -- health and metrics ----------------------------------------------------

    async def live(self, request: web.Request) -> web.StreamResponse:
        return await request[_EXCHANGE].send_json(200, _LIVE)

    async def health_ready(self, request: web.Request) -> web.StreamResponse:
        ex: Exchange = request[_EXCHANGE]
        if self.state.ready:
            return await ex.send_json(200, _READY)
        return await ex.send_json(503, _LOADING)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        page = self.state.metrics_page().encode("utf-8")
        return await request[_EXCHANGE].send(200, page, "text/plain; version=0.0.4; charset=utf-8")

    # -- models and tokenize -----------------------------------------------------

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        ex: Exchange = request[_EXCHANGE]
        refused = await self._refuse_without_key(ex)
        if refused is not None:
            return refused
        created = self.state.created
        cards = [m.card(created) for m in self.state.models.values()]
        return await ex.send_json(200, {"object": "list", "data": cards})

    async def model_card(self, request: web.Request) -> web.StreamResponse:
        ex: Exchange = request[_EXCHANGE]
        refused = await self._refuse_without_key(ex)
        if refused is not None:
            return refused
        model_id = request.match_info["model_id"]
        model = self.state.models.get(model_id)
        if model is None:
            return await ex.send_error(404, f"The model `{model_id}` does not exist.")
        return await ex.send_json(200, model.card(self.state.created))

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        ex: Exchange = request[_EXCHANGE]
        refused = await self._refuse_without_key(ex)
        if refused is not None:
            return refused
        body = ex.incoming.json
        if not isinstance(body, dict):
            return await ex.send_error(400, "The request body must be a JSON object.")
        if not self.state.ready:
            return await ex.send_error(503, "The model is loading; try again later.")
        model, name = self.state.lookup_model(body)
        if model is None:
            return await ex.send_error(404, f"The model `{name}` does not exist.")
        if isinstance(body.get("messages"), list):
            tokens = tokenize_messages(body["messages"])
        elif isinstance(body.get("prompt"), str):
            tokens = prompt_token_ids(body["prompt"])
        else:
            return await ex.send_error(
                400, "Give either 'prompt' (a string) or 'messages' (a list)."
            )
        answer = {
            "count": len(tokens),
            "max_model_len": model.max_model_len,
            "tokens": tokens,
            "token_strs": None,
        }
        return await ex.send_json(200, answer)

    # -- chat completions --------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        ex: Exchange = request[_EXCHANGE]
        refused = await self._refuse_without_key(ex)
        if refused is not None:
            return refused
        state = self.state
        started = time.monotonic()
        settings = state.settings
        body = ex.incoming.json
        if not isinstance(body, dict):
            return await ex.send_error(400, "The request body must be a JSON object.")
        if not state.ready:
            return await ex.send_error(503, "The model is loading; try again later.")
        model, name = state.lookup_model(body)
        if model is None:
            return await ex.send_error(404, f"The model `{name}` does not exist.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return await ex.send_error(400, "'messages' must be a non-empty list.")
        prompt_tokens = count_prompt_tokens(messages)
        if prompt_tokens > model.max_model_len:
            return await ex.send_error(
                400,
                f"This model's maximum context length is {model.max_model_len} tokens. "
                f"However, you requested {prompt_tokens} tokens in the messages. "
                "Please reduce the length of the messages.",
            )
        plan = plan_reply(body, model, settings)
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
        latency = model.latency if model.latency is not None else settings.latency
        token_delay = settings.token_delay
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + plan.completion_tokens,
            "completion_tokens": plan.completion_tokens,
            "prompt_tokens_details": None,
        }
        completion_id = f"chatcmpl-{os.urandom(16).hex()}"
        created = int(time.time())
        first_token_at: float | None = None

        async def events() -> AsyncGenerator[bytes, None]:
            # Runs as the stream is written: code after a ``yield`` runs once that
            # event is out, which is when the first token counts as sent.
            nonlocal first_token_at
            extra: dict[str, Any] = {"usage": None} if include_usage else {}

            def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
                choice = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                return chunk_json(completion_id, created, model.id, [choice], extra)

            if latency > 0:
                await asyncio.sleep(latency)
            deltas = stream_deltas(plan)
            for i, delta in enumerate(deltas):
                if i > 1 and token_delay > 0:
                    await asyncio.sleep(token_delay)
                yield chunk(delta)
                if first_token_at is None and i >= 1:
                    first_token_at = time.monotonic()
            if token_delay > 0 and len(deltas) > 1:
                await asyncio.sleep(token_delay)
            yield chunk({}, plan.finish_reason)
            if first_token_at is None:
                first_token_at = time.monotonic()
            if include_usage:
                yield chunk_json(completion_id, created, model.id, [], {"usage": usage})
            yield b"[DONE]"

        mm = state.model_metrics(model.id)
        await state.acquire_slot(mm)
        finish = "abort"
        try:
            if body.get("stream") is True:
                response = await ex.stream(events())
            else:
                if latency > 0:
                    await asyncio.sleep(latency)
                first_token_at = time.monotonic()
                reply = completion_json(completion_id, created, model.id, plan, usage)
                response = await ex.send(200, dumps(reply))
            if not ex.hung_up:
                finish = plan.finish_reason
            return response
        finally:
            state.release_slot(mm)
            state.finish(mm, finish, prompt_tokens, plan.completion_tokens, started, first_token_at)

    # -- admin -------------------------------------------------------------------

    async def admin(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.partition("?")[0]
        status, payload = admin_answer(self.state, request.method, path, await request.read())
        return web.Response(status=status, body=dumps(payload), content_type="application/json")
