"""Deadlines are absolute: no server stretches a turn past its deadline (+0.5 s).

Servers that send one byte per second, only keep-alives, or a header block
that never ends (alone, and 32 turns at once on one pipeline); the same
without a deadline, against the route's idle timeout; hostile ``Retry-After``
values with and without a deadline; 16 MB replies without usage on a 5 s
deadline (local token counting and sentence-by-sentence checks included),
300,000 tiny events; and replies that never end, a header line that never
ends and a gzip bomb, where memory must stay bounded too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest
from hostile_harness import (
    GRACE,
    MODES,
    SLACK,
    Expect,
    PassOutput,
    TurnOutcome,
    add_row,
    answer_is,
    async_turn,
    check_case,
    fail_message,
    judge_turn,
    record_problems,
    run_turn,
)
from hostile_server import ANSWER, RETRY_AFTER, huge_text

from nimpipe import Turn
from nimpipe.errors import DeadlineExceededError, RateLimitError, UnavailableError

DEADLINE = 2.0
SLOW = ["trickle=1", "pings=0.5", "headers_slow=0.5"]
#: Retry-After values under test: every hostile value on a 429, two on a 503.
RETRY_VALUES = [*RETRY_AFTER, "503-inf", "503-date"]


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
@pytest.mark.parametrize("value", RETRY_VALUES)
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
        Expect(answer_is(ANSWER), (RateLimitError, UnavailableError, DeadlineExceededError)),
        deadline=DEADLINE,
        recorder=recorder,
        extra=lambda _: _at_most_requests(hostile, tag, 3),
    )
    assert row.ok, fail_message(row)


#: Turns per mode in the concurrent case.
CONCURRENT = 8


def test_many_slow_turns_at_once_all_end_by_the_deadline(make_hostile: Any) -> None:
    """32 turns on one shared pipeline at once against the one-byte-per-second server:
    8 per mode, the sync ones in threads, the async ones as tasks of one event loop."""
    pipeline, recorder, _ = make_hostile("trickle=1")
    outcomes = {mode: [TurnOutcome(mode) for _ in range(CONCURRENT)] for mode in MODES}
    threads = [
        threading.Thread(
            target=run_turn,
            args=(pipeline, mode, lambda: Turn.create("hello", timeout=DEADLINE)),
            kwargs={"outcome": outcome},
            daemon=True,
        )
        for mode in ("run", "stream")
        for outcome in outcomes[mode]
    ]

    async def one(mode: str, outcome: TurnOutcome) -> None:
        started = time.monotonic()
        try:
            turn = Turn.create("hello", timeout=DEADLINE)
            outcome.result = await async_turn(pipeline, mode, turn, None, outcome)
        except BaseException as exc:  # judged below, like every outcome
            outcome.error = exc
        outcome.elapsed = time.monotonic() - started

    async def tasks() -> None:
        await asyncio.gather(*(one(m, o) for m in ("arun", "astream") for o in outcomes[m]))

    def loop() -> None:
        # Hung tasks are cancelled below: that ends the loop, it is no failure of its own.
        with contextlib.suppress(BaseException):
            asyncio.run(tasks())

    threads.append(threading.Thread(target=loop, daemon=True))
    for thread in threads:
        thread.start()
    started = time.monotonic()
    for thread in threads:
        thread.join(max(0.0, started + DEADLINE + SLACK + GRACE - time.monotonic()))
    failures = []
    for mode in MODES:
        problems = []
        for i, outcome in enumerate(outcomes[mode]):
            if not outcome.finished:
                outcome.stop()
            problems += [f"turn {i}: {p}" for p in judge_turn(outcome, Expect(), DEADLINE + SLACK)]
        times = [o.elapsed for o in outcomes[mode] if o.elapsed is not None]
        kinds = sorted({o.describe() for o in outcomes[mode]})
        row = add_row(
            f"concurrent:{CONCURRENT}x trickle=1",
            mode,
            problems + record_problems(recorder.records),
            outcome=", ".join(kinds),
            elapsed=max(times) if len(times) == CONCURRENT else None,
            deadline=DEADLINE,
            bound=DEADLINE + SLACK,
        )
        if not row.ok:
            failures.append(fail_message(row))
    assert not failures, "\n".join(failures)


#: Without a deadline, a hostile Retry-After must still end the turn within this.
NO_DEADLINE_BOUND = 60.0


def test_retry_after_without_a_deadline_is_capped(make_hostile: Any, hostile: Any) -> None:
    """Every hostile Retry-After, each mode, no deadline: all run at once, each ends by 60 s."""
    cases: list[tuple[str, str, Any, Any, str, TurnOutcome]] = []
    for value in RETRY_VALUES:
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
        expect = Expect(answer_is(ANSWER), (RateLimitError, UnavailableError))
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
def test_a_huge_reply_under_sentence_checks_ends_by_the_deadline(
    make_hostile: Any, mode: str
) -> None:
    """16 MB without a sentence end, checked sentence by sentence: never quadratic past 5 s."""
    expected = huge_text("a")
    pipeline, recorder, _ = make_hostile(
        "huge=a", plugins=(PassOutput(),), stream_policy="sentence", max_retries=0
    )
    row = check_case(
        "huge:huge=a:sentence",
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
def test_many_tiny_events_end_by_the_deadline(make_hostile: Any, mode: str) -> None:
    """300,000 one-character events: the answer, or a typed error, by 2.5 s."""
    deadline = DEADLINE
    pipeline, recorder, _ = make_hostile("many_events=300000", max_retries=0)
    row = check_case(
        "many_events=300000",
        mode,
        pipeline,
        lambda: Turn.create("hello", timeout=deadline),
        Expect(answer_is("a" * 300_000)),
        deadline=deadline,
        memory_mb=200,
        recorder=recorder,
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", ["endless", "header_flood", "gzip_bomb"])
def test_a_reply_without_end_keeps_memory_bounded(
    make_hostile: Any, scenario: str, mode: str
) -> None:
    """Bytes without end (an SSE line, a JSON string, a header line; 64-256 MB sent), or a
    gzip body of 1 MB that inflates to 256 MB: a typed error, under 200 MB."""
    deadline = 3.0
    pipeline, recorder, _ = make_hostile(scenario, max_retries=0)
    row = check_case(
        scenario,
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
