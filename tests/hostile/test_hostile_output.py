"""Output checks see all output, and a retry never releases text twice.

A reply holding text and tool calls passes ``post_output`` like any other: a
blocked word in its text never reaches the caller, in any mode or release
policy.  A stream cut after sentences were released, then retried, leaves the
consumer with exactly the final answer (or a typed error), never the released
sentences twice.
"""

from __future__ import annotations

from typing import Any

import pytest
from hostile_harness import (
    MODES,
    Expect,
    PassOutput,
    TurnOutcome,
    Validator,
    answer_is,
    check_case,
    fail_message,
)
from hostile_server import FORBIDDEN, OTHER_SENTENCES, SENTENCES

from nimpipe import Block, Output, Turn, TurnResult, hookimpl

DEADLINE = 3.0
POLICIES = ("buffer", "sentence")


class BlockWord:
    """Blocks any output that holds the forbidden word."""

    @hookimpl
    def post_output(self, output: Output) -> Block | None:
        if FORBIDDEN in output.text:
            return Block(reason="forbidden word", rule="forbidden-word")
        return None


def never_released(word: str) -> Validator:
    """``word`` is in no chunk the consumer received and not in the result's text."""

    def validate(result: TurnResult, outcome: TurnOutcome) -> list[str]:
        return _leaks(word, result, outcome)

    return validate


def _leaks(word: str, result: TurnResult | None, outcome: TurnOutcome) -> list[str]:
    problems = []
    released = "".join(c for c in outcome.chunks if isinstance(c, str))
    if word in released:
        problems.append(f"{word} reached the consumer in the released text")
    if result is not None and word in result.text:
        problems.append(f"{word} is in result.text")
    return problems


def no_leak_on_error(outcome: TurnOutcome) -> list[str]:
    # A typed error is a fine end, but what was released before it must be clean too.
    return _leaks(FORBIDDEN, None, outcome) if outcome.error is not None else []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scenario", ["text_and_tools", "text_forbidden"])
def test_a_blocked_word_never_reaches_the_caller(
    make_hostile: Any, scenario: str, policy: str, mode: str
) -> None:
    pipeline, recorder, _ = make_hostile(scenario, plugins=(BlockWord(),), stream_policy=policy)
    row = check_case(
        f"output:{scenario}:{policy}",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=DEADLINE),
        Expect(never_released(FORBIDDEN)),
        deadline=DEADLINE,
        recorder=recorder,
        extra=no_leak_on_error,
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("retry_into", ["same", "other"])
def test_a_retry_after_a_cut_stream_releases_nothing_twice(
    make_hostile: Any, hostile: Any, retry_into: str, policy: str, mode: str
) -> None:
    """The first reply is cut after two sentences; the retry answers whole.

    The consumer's concatenated chunks must equal the final answer exactly
    (``same``: the released sentences once; ``other``: a retry into different
    words cannot follow released text, so only a typed error or an answer
    released once is right).
    """
    expected = "".join(SENTENCES if retry_into == "same" else OTHER_SENTENCES)
    pipeline, recorder, tag = make_hostile(
        f"cut_then_answer={retry_into}",
        plugins=(PassOutput(),),
        stream_policy=policy,
        max_retries=2,
    )

    def sentences_once(outcome: TurnOutcome) -> list[str]:
        released = "".join(c for c in outcome.chunks if isinstance(c, str))
        repeated = [s for s in (*SENTENCES, *OTHER_SENTENCES) if released.count(s.strip()) > 1]
        problems = [f"released twice: {repeated}"] if repeated else []
        if outcome.result is not None and hostile.count(tag) < 2:
            problems.append("the cut reply was not retried: the case did not run as meant")
        return problems

    row = check_case(
        f"retry_release:{retry_into}:{policy}",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=DEADLINE),
        Expect(answer_is(expected)),
        deadline=DEADLINE,
        recorder=recorder,
        extra=sentences_once,
    )
    assert row.ok, fail_message(row)
