"""A NeMo Guardrails server as a check backend: rails-only checks, and guarded generation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from nimpipe.errors import BackendUnavailable
from nimpipe.stage import scrub, scrub_fields
from nimpipe.types import ToolCall, Verdict
from nimpipe_contrib.guardrails.backends.base import elapsed, rails_verdict, render_tool_call
from nimpipe_contrib.guardrails.backends.http import JsonClient, chat_reply, error_text

__all__ = ["GuardedCompletion", "MicroserviceBackend"]


@attrs.frozen(kw_only=True)
class GuardedCompletion:
    """What a guarded generation returned: the text and the rails' verdicts."""

    text: str
    blocked: bool
    verdicts: tuple[Verdict, ...]
    latency: float
    #: The server's ``usage`` object, when it sent one.
    usage: Mapping[str, Any] | None = None


@attrs.define(kw_only=True)
class MicroserviceBackend:
    """A NeMo Guardrails server (``nemoguardrails server``, or the NIM microservice).

    :param url: the server root, e.g. ``http://127.0.0.1:8000``.
    :param config_id: the rails configuration to use; ``None`` for the
        server's default.
    :param timeout: seconds for one HTTP request.
    :param api_key: bearer token, when the server wants one.
    """

    url: str
    config_id: str | None = None
    timeout: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    name: str = "microservice"
    _http: JsonClient = attrs.field(init=False)
    #: Rail kinds the server has no rails for (learnt from its 422 answers).
    _missing: set[str] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self._http = JsonClient(self.name, self.timeout, self.api_key)

    def _guardrails(self, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = dict(extra)
        if self.config_id:
            data["config_id"] = self.config_id
        return data

    async def start(self) -> None:
        """Nothing to load: the server holds the rails."""

    async def _check(
        self,
        kind: Literal["input", "output", "tool call"],
        messages: list[dict[str, str]],
        original: str,
        model: str,
    ) -> Verdict | None:
        rail_type = "input" if kind == "input" else "output"
        if rail_type in self._missing:
            return None
        body = {
            "model": model,
            "messages": messages,
            "guardrails": self._guardrails(rail_types=[rail_type]),
        }
        started = time.perf_counter()
        status, data = await self._http.post_json(f"{self.url}/v1/checks", body)
        latency = elapsed(started)
        if status == 422 and "no configured rails" in error_text(data):
            self._missing.add(rail_type)
            return None
        if status != 200 or not isinstance(data, Mapping) or "status" not in data:
            raise BackendUnavailable(self.name, f"HTTP {status}: {error_text(data)}")
        return rails_verdict(
            self.name,
            kind,
            data["status"],
            data.get("rail"),
            data.get("content"),
            original,
            latency,
        )

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Run the configuration's input rails on ``text`` (``/v1/checks``)."""
        return await self._check("input", [{"role": "user", "content": text}], text, model)

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Run the output rails on the answer ``text`` to ``prompt``."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return await self._check("output", messages, text, model)

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Run the output rails on a proposed tool call (rendered as text)."""
        text = render_tool_call(call)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return await self._check("tool call", messages, text, model)

    async def guarded_completion(
        self, messages: Sequence[Mapping[str, Any]], model: str
    ) -> GuardedCompletion:
        """One guarded generation: the server runs the input rails, the model and the output rails.

        Costs a whole model call on the server's side; the verdicts come from
        the ``guardrails.log.activated_rails`` of the answer.
        """
        body = {
            "model": model,
            "messages": [dict(m) for m in messages],
            "guardrails": self._guardrails(
                options={
                    "log": {"activated_rails": True},
                    "output_vars": ["triggered_input_rail", "triggered_output_rail"],
                }
            ),
        }
        started = time.perf_counter()
        status, data = await self._http.post_json(f"{self.url}/v1/chat/completions", body)
        latency = elapsed(started)
        text = scrub(chat_reply(self.name, status, data))
        guardrails = data.get("guardrails") if isinstance(data, Mapping) else None
        verdicts: list[Verdict] = []
        blocked = False
        log = guardrails.get("log") if isinstance(guardrails, Mapping) else None
        for rail in (log or {}).get("activated_rails") or ():
            if not isinstance(rail, Mapping) or rail.get("type") not in ("input", "output"):
                continue
            stopped = bool(rail.get("stop"))
            blocked = blocked or stopped
            verdicts.append(
                scrub_fields(
                    Verdict(
                        rule=str(rail.get("name") or rail.get("type")),
                        decision="block" if stopped else "pass",
                        backend=f"{self.name}:guarded",
                        latency=float(rail.get("duration") or 0.0),
                        detail=f"{rail.get('type')} rail",
                    )
                )
            )
        usage = data.get("usage") if isinstance(data, Mapping) else None
        return GuardedCompletion(
            text=text,
            blocked=blocked,
            verdicts=tuple(verdicts),
            latency=latency,
            usage=usage if isinstance(usage, Mapping) else None,
        )

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()
