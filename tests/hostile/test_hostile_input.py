"""Bad input is a typed, non-transient error raised before anything is sent.

Lone surrogates anywhere in a turn, a tool schema or request parameters
nested 5,000 deep: the request cannot be sent as it is, so no retry can help
and the server must never see one (its request count stays at zero).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hostile_harness import MODES, Expect, TurnOutcome, check_case, fail_message, not_transient

from nimpipe import Message, ToolCall, ToolSpec, Turn

DEADLINE = 3.0
DEPTH = 5_000


def nested(depth: int) -> dict[str, Any]:
    """A mapping nested ``depth`` deep."""
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        node = {"a": node}
    return node


def nested_schema(depth: int) -> dict[str, Any]:
    """A JSON schema whose properties nest ``depth`` objects deep."""
    node: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}}
    return node


TURNS: dict[str, Callable[[], Turn]] = {
    "schema_deep": lambda: Turn.create(
        "hello",
        timeout=DEADLINE,
        tools=[ToolSpec(name="deep", parameters=nested_schema(DEPTH))],
    ),
    "params_deep": lambda: Turn.create(
        "hello", timeout=DEADLINE, params={"metadata": nested(DEPTH)}
    ),
    "surrogate_prompt": lambda: Turn.create("hello \ud800 there", timeout=DEADLINE),
    "surrogate_low": lambda: Turn.create("\udfff", timeout=DEADLINE),
    "surrogate_system": lambda: Turn.create("hello", system="be \ud83d brief", timeout=DEADLINE),
    "surrogate_tool": lambda: Turn.create(
        "hello", timeout=DEADLINE, tools=[ToolSpec(name="t", description="bad \ud800")]
    ),
    "surrogate_params": lambda: Turn.create(
        "hello", timeout=DEADLINE, params={"user": "agent-\udc00"}
    ),
    "surrogate_history": lambda: Turn.create(
        [Message.user("hi"), Message.assistant("half \ud800 answer"), Message.user("again")],
        timeout=DEADLINE,
    ),
    "surrogate_tool_args": lambda: Turn.create(
        [
            Message.user("hi"),
            Message.assistant(tool_calls=(ToolCall("c1", "t", '{"q": "\ud800"}'),)),
            Message.tool("c1", "result"),
        ],
        timeout=DEADLINE,
    ),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(TURNS))
def test_bad_input_is_refused_before_sending(
    make_hostile: Any, hostile: Any, case: str, mode: str
) -> None:
    pipeline, recorder, tag = make_hostile("ok", max_retries=2)

    def nothing_sent(outcome: TurnOutcome) -> list[str]:
        problems = []
        if outcome.error is not None and not not_transient(outcome.error):
            problems.append(f"{type(outcome.error).__name__} is transient: it would be retried")
        count = hostile.count(tag)
        if count:
            problems.append(f"{count} requests reached the server")
        return problems

    row = check_case(
        f"input:{case}",
        mode,
        pipeline,
        TURNS[case],
        Expect(),
        deadline=DEADLINE,
        recorder=recorder,
        extra=nothing_sent,
    )
    assert row.ok, fail_message(row)
