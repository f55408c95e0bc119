"""Every malformed reply ends in a typed nimpipe error or a correct answer.

Never a bare ``TypeError``, ``OverflowError`` or ``RecursionError``, never a
non-text chunk (or text that is not valid Unicode) handed to the consumer,
never impossible usage in a record, never a cut stream taken for a complete
answer, and never more requests than the route's retries allow.  Legal but
unusual SSE (multi-line data, CRLF, no space after ``data:``, extra fields)
must be read as the answer it is.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hostile_harness import (
    MODES,
    Expect,
    TurnOutcome,
    Validator,
    all_of,
    answer_is,
    check_case,
    clean_text,
    fail_message,
    sane_usage,
)
from hostile_server import ANSWER

from nimpipe import FinishReason, Turn, TurnResult

DEADLINE = 3.0
#: No transport retries: one request per case (retries of typed errors are tested elsewhere).
RETRIES = 0


def well_formed_tools(names: set[str]) -> Validator:
    """Tool calls whose id, name and arguments are text, arguments JSON, names known."""

    def validate(result: TurnResult, outcome: TurnOutcome) -> list[str]:
        problems = []
        if not result.tool_calls:
            problems.append("no tool call in the answer")
        for call in result.tool_calls:
            fields = {"id": call.id, "name": call.name, "arguments": call.arguments}
            for name, value in fields.items():
                if not isinstance(value, str):
                    problems.append(f"tool call {name} is {type(value).__name__}: {value!r}")
            if isinstance(call.arguments, str):
                try:
                    json.loads(call.arguments)
                except ValueError:
                    problems.append(f"tool call arguments are not JSON: {call.arguments!r}")
            if call.name not in names:
                problems.append(f"tool call name {call.name!r} was never sent")
        return problems

    return validate


def text_only(result: TurnResult, outcome: TurnOutcome) -> list[str]:
    """Text is text: the consumer and the result only ever see strings."""
    return [] if isinstance(result.text, str) else [f"text is {type(result.text).__name__}"]


def complete_answer(result: TurnResult, outcome: TurnOutcome) -> list[str]:
    problems = answer_is(ANSWER)(result, outcome)
    if result.finish_reason is not FinishReason.STOP:
        problems.append(f"finish reason {result.finish_reason.value}")
    return problems


ERROR = Expect()
#: scenario -> what it may end in.  ``Expect()``: a typed error only.
CASES: dict[str, Expect] = {
    "tool_calls_int": ERROR,
    "tool_calls_str": ERROR,
    "tool_fields": Expect(well_formed_tools({"7"})),
    **{
        f"tool_index={kind}": Expect(well_formed_tools({"lookup", "fetch"}))
        for kind in ("str", "float", "null", "huge", "negative", "bool", "object")
    },
    **{
        f"usage={kind}": Expect(all_of(answer_is(ANSWER), sane_usage))
        for kind in (
            "inf",
            "huge",
            "negative",
            "strings",
            "nan",
            "infinity",
            "float",
            "bool",
            "object",
        )
    },
    "deep_json": ERROR,
    **{
        f"content={kind}": Expect(text_only)
        for kind in ("number", "object", "list", "bool", "huge_number")
    },
    "choices_empty": ERROR,
    "choices_bad": ERROR,
    "not_json": ERROR,
    "html": ERROR,
    "empty": ERROR,
    "error_event": ERROR,
    # Close-delimited and cut before the finish reason or [DONE]: a cut stream.
    "cut_close": ERROR,
    # Framed (chunked / Content-Length) and cut short.
    "cut_chunked": ERROR,
    # Close-delimited, every text event and the finish reason arrived, then the
    # connection closed without usage or [DONE]: the answer is complete, so it
    # is accepted (usage is then counted locally).  Plain: complete JSON.
    "finish_no_done": Expect(all_of(complete_answer, sane_usage)),
    # The wire itself.
    "drop": ERROR,
    "garbage": ERROR,
    "bad_utf8": Expect(clean_text),
    "reply_surrogate": Expect(clean_text),
    "finish_weird": Expect(answer_is(ANSWER)),
    "delta_bad": Expect(answer_is(ANSWER)),
    # Legal SSE that a parser must read: the answer, never an error.
    **{
        name: Expect(all_of(complete_answer, sane_usage), errors=())
        for name in ("sse_multiline", "sse_crlf", "sse_no_space", "sse_fields")
    },
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", list(CASES))
def test_a_malformed_reply_is_typed(
    make_hostile: Any, hostile: Any, scenario: str, mode: str
) -> None:
    pipeline, recorder, tag = make_hostile(scenario, max_retries=RETRIES)

    def requests_bounded(outcome: TurnOutcome) -> list[str]:
        count = hostile.count(tag)
        most = RETRIES + 1
        return [f"{count} requests for {most} allowed tries"] if count > most else []

    row = check_case(
        f"reply:{scenario}",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=DEADLINE),
        CASES[scenario],
        deadline=DEADLINE,
        recorder=recorder,
        extra=requests_bounded,
    )
    assert row.ok, fail_message(row)
