"""Deadlines are absolute: no server stretches a turn past its deadline (+0.5 s).

Servers that send one byte per second, only keep-alives, or a header block
that never ends; hostile ``Retry-After`` values with and without a deadline;
16 MB replies without usage on a 5 s deadline (local token counting included),
and replies that never end (memory stays bounded).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hostile_harness import (
    GRACE,
    MODES,
    SLACK,
    Expect,
    TurnOutcome,
    add_row,
    answer_is,
    check_case,
    fail_message,
    judge_turn,
    record_problems,
    run_turn,
)
from hostile_server import ANSWER, RETRY_AFTER, huge_text

from nimpipe import Turn
from nimpipe.errors import DeadlineExceededError, RateLimitError

DEADLINE = 2.0
SLOW = ["trickle=1", "pings=0.5", "headers_slow=0.5"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SLOW)
def test_a_slow_server_ends_by_the_deadline(make_hostile: Any, scenario: str, mode: str) -> None:
    # The route's own timeout (60 s) is far away: only the turn's deadline can end it.
    pipeline, recorder, _ = make_hostile(scenario)
    row = check_case(
        f"deadline:{scenario}",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=DEADLINE),
        Expect(),
        deadline=DEADLINE,
        recorder=recorder,
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", SLOW)
def test_a_slow_server_ends_by_the_route_timeout(
    make_hostile: Any, scenario: str, mode: str
) -> None:
    # No deadline: the route's timeout (an idle limit that bytes without an
    # event, or a plain reply that never completes, do not reset) ends it.
    timeout = 1.0
    pipeline, recorder, _ = make_hostile(scenario, timeout=timeout, max_retries=0)
    row = check_case(
        f"idle:{scenario}",
        mode,
        pipeline,
        lambda: Turn.create("hello"),
        Expect(),
        deadline=timeout,
        recorder=recorder,
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", list(RETRY_AFTER))
def test_retry_after_within_a_deadline(
    make_hostile: Any, hostile: Any, value: str, mode: str
) -> None:
    """A first 429 with a hostile Retry-After: a quick RateLimitError, or the answer, by 2.5 s."""
    pipeline, recorder, tag = make_hostile(f"retry_after={value}", max_retries=2)
    row = check_case(
        f"retry_after={value}:deadline",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=DEADLINE),
        Expect(answer_is(ANSWER), (RateLimitError, DeadlineExceededError)),
        deadline=DEADLINE,
        recorder=recorder,
        extra=lambda _: _at_most_requests(hostile, tag, 3),
    )
    assert row.ok, fail_message(row)


#: Without a deadline, a hostile Retry-After must still end the turn within this.
NO_DEADLINE_BOUND = 60.0


def test_retry_after_without_a_deadline_is_capped(make_hostile: Any, hostile: Any) -> None:
    """Every hostile Retry-After, each mode, no deadline: all run at once, each ends by 60 s."""
    cases: list[tuple[str, str, Any, Any, str, TurnOutcome]] = []
    for value in RETRY_AFTER:
        for mode in MODES:
            pipeline, recorder, tag = make_hostile(f"retry_after={value}", max_retries=1)
            cases.append((value, mode, pipeline, recorder, tag, TurnOutcome(mode)))
    threads = []
    for _, mode, pipeline, _, _, outcome in cases:
        thread = threading.Thread(
            target=run_turn,
            args=(pipeline, mode, lambda: Turn.create("hello")),
            kwargs={"outcome": outcome},
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    started = time.monotonic()
    for thread in threads:
        thread.join(max(0.0, started + NO_DEADLINE_BOUND + GRACE - time.monotonic()))
    failures = []
    for value, mode, _, recorder, tag, outcome in cases:
        if not outcome.finished:
            outcome.stop()
        expect = Expect(answer_is(ANSWER), (RateLimitError,))
        problems = judge_turn(outcome, expect, NO_DEADLINE_BOUND)
        problems += record_problems(recorder.records)
        if outcome.finished:
            problems += _at_most_requests(hostile, tag, 2)
        row = add_row(
            f"retry_after={value}:no-deadline",
            mode,
            problems,
            outcome=outcome.describe(),
            elapsed=outcome.elapsed,
            deadline=None,
            bound=NO_DEADLINE_BOUND,
        )
        if not row.ok:
            failures.append(fail_message(row))
    assert not failures, "\n".join(failures)


def _at_most_requests(hostile: Any, tag: str, most: int) -> list[str]:
    count = hostile.count(tag)
    return [f"{count} requests, at most {most} expected"] if count > most else []


HUGE_DEADLINE = 5.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", ["huge=a", "huge=words", "huge_event"])
def test_a_huge_reply_without_usage_ends_by_the_deadline(
    make_hostile: Any, scenario: str, mode: str
) -> None:
    """16 MB of content and no usage: the answer (usage counted in time) or a typed error."""
    kind = scenario.partition("=")[2] or "a"
    expected = huge_text(kind)
    pipeline, recorder, _ = make_hostile(scenario, max_retries=0)
    row = check_case(
        f"huge:{scenario}",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=HUGE_DEADLINE),
        Expect(answer_is(expected)),
        deadline=HUGE_DEADLINE,
        memory_mb=200,
        recorder=recorder,
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("mode", MODES)
def test_a_reply_without_end_keeps_memory_bounded(make_hostile: Any, mode: str) -> None:
    """An SSE line or a JSON string that never ends (256 MB sent): a typed error, < 200 MB."""
    deadline = 3.0
    pipeline, recorder, _ = make_hostile("endless", max_retries=0)
    row = check_case(
        "endless",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=deadline),
        Expect(),
        deadline=deadline,
        bound=deadline + SLACK,
        memory_mb=200,
        recorder=recorder,
    )
    assert row.ok, fail_message(row)
