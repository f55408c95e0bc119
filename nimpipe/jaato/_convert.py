"""Mapping between jaato's provider types and nimpipe's.

jaato's ``Message`` / ``Part`` / ``ToolSchema`` / ``FunctionCall`` /
``ToolResult`` become nimpipe :class:`~nimpipe.types.Message` and
:class:`~nimpipe.types.ToolSpec` values, and a
:class:`~nimpipe.types.TurnResult` becomes jaato's ``ProviderResponse``.

Stages always see real tool names.  On the wire the names are jaato's opaque
ids (``t_<8 hex>``, from ``shared.tool_id_map``), exactly as jaato's own
providers send them: jaato's system prompt and its ``list_tools`` /
``get_tool_schemas`` tools speak in those ids.  :class:`JaatoWireProvider`
does that translation around each model call.

This module imports ``jaato_sdk``: only the provider imports it, when jaato
calls it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.provider import OpenAIProvider
from nimpipe.types import FinishReason, Message, Response, Role, ToolCall, ToolSpec, Turn

try:
    from jaato_sdk.plugins.model_provider.types import FinishReason as JaatoFinishReason
    from jaato_sdk.plugins.model_provider.types import (
        FunctionCall,
        Part,
        ProviderResponse,
        TokenUsage,
        parse_tool_call_arguments,
        render_result_for_model,
        resolve_tool_use_finish,
    )
except ImportError as exc:
    raise ImportError(
        "nimpipe's jaato integration needs jaato's SDK: pip install 'nimpipe[jaato]'"
    ) from exc

try:
    from shared.tool_id_map import id_to_name, name_to_id
except ImportError:  # outside jaato-server: real names on the wire
    id_to_name = name_to_id = str

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nimpipe.types import Route, TurnResult

__all__ = [
    "JaatoWireProvider",
    "finish_reason",
    "messages_from_jaato",
    "provider_response",
    "tools_from_jaato",
]

#: nimpipe finish reasons -> jaato's.
_FINISH = {
    FinishReason.STOP: JaatoFinishReason.STOP,
    FinishReason.LENGTH: JaatoFinishReason.MAX_TOKENS,
    FinishReason.TOOL_CALLS: JaatoFinishReason.TOOL_USE,
    FinishReason.CONTENT_FILTER: JaatoFinishReason.SAFETY,
    FinishReason.BLOCKED: JaatoFinishReason.SAFETY,
    FinishReason.ERROR: JaatoFinishReason.ERROR,
    FinishReason.CANCELLED: JaatoFinishReason.CANCELLED,
}


# --------------------------------------------------------------------------
# jaato -> nimpipe
# --------------------------------------------------------------------------


def _arguments(call: Any) -> str:
    """The JSON text of a jaato ``FunctionCall``'s arguments (raw text if unreadable)."""
    unreadable = getattr(call, "unreadable_args", None)
    if unreadable is not None:
        return str(unreadable)
    return json.dumps(call.args or {})


def _tool_result_text(result: Any) -> str:
    return render_result_for_model(
        result.result,
        result.model_suffix,
        untrusted=result.untrusted,
        untrusted_source=result.untrusted_source,
    )


def _convert_message(message: Any) -> Iterator[Message]:
    parts = message.parts
    if len(parts) == 1 and parts[0].text and message.role != "model":
        yield Message(Role.USER, parts[0].text)
        return
    responses = [p.function_response for p in parts if p.function_response is not None]
    if responses:
        # One nimpipe tool message per result: the OpenAI format wants one per call id.
        for result in responses:
            yield Message.tool(result.call_id, _tool_result_text(result), result.name or None)
        return
    text = "".join(p.text for p in parts if p.text) or None
    if message.role == "model":
        calls = tuple(
            ToolCall(id=c.id, name=c.name, arguments=_arguments(c))
            for c in (p.function_call for p in parts)
            if c is not None
        )
        if text is None and not calls:
            return
        yield Message(Role.ASSISTANT, text, calls)
        return
    if text is not None:
        yield Message(Role.USER, text)


def messages_from_jaato(messages: Iterable[Any], system_instruction: str | None) -> list[Message]:
    """nimpipe messages for jaato's history plus its system instruction.

    Text and tool traffic are carried; thoughts and binary attachments are
    not (nimpipe messages are text).
    """
    out: list[Message] = []
    if system_instruction:
        out.append(Message(Role.SYSTEM, system_instruction))
    for message in messages:
        out.extend(_convert_message(message))
    return out


def tools_from_jaato(tools: Sequence[Any] | None) -> tuple[ToolSpec, ...]:
    """nimpipe tool specs for jaato ``ToolSchema`` objects (real names)."""
    if not tools:
        return ()
    return tuple(
        ToolSpec(name=t.name, description=t.description or "", parameters=t.parameters or {})
        for t in tools
    )


# --------------------------------------------------------------------------
# nimpipe -> jaato
# --------------------------------------------------------------------------


def finish_reason(result: TurnResult) -> Any:
    """jaato's ``FinishReason`` for a pipeline result (a block is ``SAFETY``)."""
    observed = _FINISH.get(result.finish_reason, JaatoFinishReason.UNKNOWN)
    return resolve_tool_use_finish(observed, bool(result.tool_calls) and result.blocked is None)


def provider_response(result: TurnResult, text: str | None = None) -> Any:
    """jaato's ``ProviderResponse`` for a pipeline result.

    ``text`` replaces the result's text (the streamed text when a turn was
    cut short).  Usage is the answering call's; ``cost_usd`` is the sum over
    every call of the turn when a route has a price, else ``None``.
    """
    body = result.text if text is None else text
    parts = [Part(text=body)] if body else []
    if result.blocked is None:
        for call in result.tool_calls:
            args, unreadable = parse_tool_call_arguments(call.arguments)
            parts.append(
                Part(
                    function_call=FunctionCall(
                        id=call.id, name=call.name, args=args, unreadable_args=unreadable
                    )
                )
            )
    usage = result.response.usage if result.response is not None else None
    priced = any(r.price_source != "none" for r in result.records)
    token_usage = TokenUsage(
        prompt_tokens=usage.prompt_tokens if usage else 0,
        output_tokens=usage.completion_tokens if usage else 0,
        total_tokens=usage.total_tokens if usage else 0,
        cost_usd=result.cost_usd if priced else None,
    )
    return ProviderResponse(parts=parts, usage=token_usage, finish_reason=finish_reason(result))


# --------------------------------------------------------------------------
# Tool names on the wire
# --------------------------------------------------------------------------


def _to_wire(turn: Turn) -> Turn:
    if not turn.tools and not any(m.tool_calls for m in turn.messages):
        return turn
    messages = tuple(
        attrs.evolve(
            m, tool_calls=tuple(attrs.evolve(c, name=name_to_id(c.name)) for c in m.tool_calls)
        )
        if m.tool_calls
        else m
        for m in turn.messages
    )
    tools = tuple(attrs.evolve(t, name=name_to_id(t.name)) for t in turn.tools)
    params: Mapping[str, Any] = turn.params
    choice = params.get("tool_choice")
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        function = dict(choice["function"])
        function["name"] = name_to_id(str(function.get("name", "")))
        params = {**params, "tool_choice": {**choice, "function": function}}
    return attrs.evolve(turn, messages=messages, tools=tools, params=params)


def _from_wire(response: Response) -> Response:
    if not response.tool_calls:
        return response
    calls = tuple(attrs.evolve(c, name=id_to_name(c.name)) for c in response.tool_calls)
    return attrs.evolve(response, tool_calls=calls)


@attrs.define
class JaatoWireProvider(OpenAIProvider):
    """The OpenAI-compatible provider, speaking jaato's tool ids on the wire.

    Stages see real tool names in turns and responses; only the request and
    the reply carry jaato's ``t_<hash>`` ids.
    """

    def complete(self, route: Route, turn: Turn, timeout: float) -> Response:
        return _from_wire(super().complete(route, _to_wire(turn), timeout))

    async def acomplete(self, route: Route, turn: Turn, timeout: float) -> Response:
        return _from_wire(await super().acomplete(route, _to_wire(turn), timeout))

    def stream(self, route: Route, turn: Turn, timeout: float) -> Iterator[str | Response]:
        items = super().stream(route, _to_wire(turn), timeout)
        try:
            for item in items:
                yield _from_wire(item) if isinstance(item, Response) else item
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    async def astream(
        self, route: Route, turn: Turn, timeout: float
    ) -> AsyncIterator[str | Response]:
        async for item in super().astream(route, _to_wire(turn), timeout):
            yield _from_wire(item) if isinstance(item, Response) else item
