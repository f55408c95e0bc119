"""Running one hostile case in one mode, measured, and judging how it ended.

A case runs in a worker thread (the four modes as a caller uses them: ``run``,
``asyncio.run(arun)``, iterating ``stream``, iterating ``astream`` on its own
event loop) while the test thread watches the clock: a case that does not end
is reported with what it had produced, never waited on forever.  Memory is
measured with :mod:`tracemalloc` (the peak of what the case allocated) and
the process's resident set (its growth), both while the case runs.

Every case ends in one :class:`Row` of the session's summary table (see
``conftest.py``): mode, outcome, time against its deadline, peak memory and
what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nimpipe import (
    CallRecord,
    FinishReason,
    NimpipeError,
    Output,
    Turn,
    TurnResult,
    hookimpl,
)
from nimpipe.errors import ProviderError

MODES = ("run", "arun", "stream", "astream")
STREAMING = frozenset({"stream", "astream"})
#: How long past its bound a case is watched before it is reported as hung.
GRACE = 2.0
#: Allowed lateness past a deadline.
SLACK = 0.5
#: Largest token count a record may carry: exact in a float, fits an SQLite integer.
MAX_TOKENS = 2**53
MB = 2**20

#: Every row of the session, for the summary table.
ROWS: list[Row] = []


@dataclass
class Row:
    """One case in one mode, as the summary table shows it."""

    case: str
    mode: str
    ok: bool
    outcome: str
    elapsed: float | None
    deadline: float | None
    bound: float | None
    peak_mb: float
    rss_mb: float
    problems: list[str] = field(default_factory=list)

    @property
    def overshoot(self) -> float | None:
        if self.elapsed is None or self.deadline is None:
            return None
        return self.elapsed - self.deadline


# --------------------------------------------------------------------------
# Plugins every hostile pipeline carries
# --------------------------------------------------------------------------


class Recorder:
    """Keeps every call record, to check that no hostile reply poisons one."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        self.records.append(record)


class PassOutput:
    """Passes every output; its presence makes the pipeline hold streamed text back."""

    @hookimpl
    def post_output(self, output: Output) -> None:
        return None


def record_problems(records: Sequence[CallRecord]) -> list[str]:
    """What is impossible in the call records: tokens out of range, cost not a finite >= 0."""
    problems = []
    for r in records:
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(r, name)
            if type(value) is not int or not 0 <= value <= MAX_TOKENS:
                problems.append(f"record {r.outcome}/{r.attempt}: {name} = {value!r}")
        cost = r.cost_usd
        if not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
            problems.append(f"record {r.outcome}/{r.attempt}: cost_usd = {cost!r}")
    return problems


# --------------------------------------------------------------------------
# One turn in one mode
# --------------------------------------------------------------------------


@dataclass
class TurnOutcome:
    """How one turn ended (filled in as it runs, so a hung turn still shows its chunks)."""

    mode: str
    result: TurnResult | None = None
    error: BaseException | None = None
    chunks: list[Any] = field(default_factory=list)
    started: float | None = None
    elapsed: float | None = None
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task[Any] | None = None

    @property
    def finished(self) -> bool:
        return self.elapsed is not None

    def describe(self) -> str:
        if not self.finished:
            return "hung"
        if self.error is not None:
            return type(self.error).__name__
        assert self.result is not None
        if self.result.blocked is not None:
            return f"blocked ({self.result.blocked.rule or self.result.blocked.plugin})"
        finish = getattr(self.result.finish_reason, "value", self.result.finish_reason)
        return f"answer ({finish}, {len(self.result.text)} chars)"

    def stop(self) -> None:
        """Cancel an async turn that outlived its watch (frees its socket)."""
        loop, task = self.loop, self.task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)


def run_turn(
    pipeline: Any,
    mode: str,
    make_turn: Callable[[], Turn],
    *,
    cancel: Any = None,
    outcome: TurnOutcome | None = None,
) -> TurnOutcome:
    """Run one turn in ``mode`` in the calling thread; never raises."""
    outcome = outcome or TurnOutcome(mode)
    started = outcome.started = time.monotonic()
    try:
        turn = make_turn()
        if mode == "run":
            outcome.result = pipeline.run(turn, cancel=cancel)
        elif mode == "stream":
            stream = pipeline.stream(turn, cancel=cancel)
            for item in stream:
                outcome.chunks.append(item)
            outcome.result = stream.result
        elif mode in ("arun", "astream"):
            outcome.result = asyncio.run(async_turn(pipeline, mode, turn, cancel, outcome))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    except BaseException as exc:  # judged by the caller: any exception is an outcome
        outcome.error = exc
    outcome.elapsed = time.monotonic() - started
    return outcome


async def async_turn(
    pipeline: Any, mode: str, turn: Turn, cancel: Any, outcome: TurnOutcome
) -> TurnResult | None:
    """``arun`` or ``astream`` one turn on the running loop; released chunks go to ``outcome``."""
    outcome.loop = asyncio.get_running_loop()
    outcome.task = asyncio.current_task()
    if mode == "arun":
        return await pipeline.arun(turn, cancel=cancel)
    stream = pipeline.astream(turn, cancel=cancel)
    async for item in stream:
        outcome.chunks.append(item)
    return stream.result


# --------------------------------------------------------------------------
# Watching: a thread, the clock, memory
# --------------------------------------------------------------------------


@dataclass
class Watched:
    """What a watched function did: its value or exception, time and memory."""

    value: Any = None
    error: BaseException | None = None
    finished: bool = False
    elapsed: float = 0.0
    peak_bytes: int = 0
    rss_growth: int = 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def watch(
    fn: Callable[[], Any],
    limit: float,
    *,
    name: str = "hostile-case",
    stuck: Callable[[], bool] | None = None,
) -> Watched:
    """Run ``fn`` in a daemon thread; wait at most ``limit`` seconds; measure memory.

    ``stuck`` (checked ten times a second) gives up on ``fn`` early.
    """
    watched = Watched()

    def target() -> None:
        try:
            watched.value = fn()
        except BaseException as exc:  # reported, never lost in the thread
            watched.error = exc
        finally:
            watched.finished = True

    baseline = _rss()
    highest = [baseline]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            highest[0] = max(highest[0], _rss())

    sampler = threading.Thread(target=sample, name="hostile-rss", daemon=True)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start_traced = tracemalloc.get_traced_memory()[0]
    worker = threading.Thread(target=target, name=name, daemon=True)
    started = time.monotonic()
    sampler.start()
    worker.start()
    give_up = started + limit
    while worker.is_alive() and time.monotonic() < give_up:
        worker.join(min(0.1, max(0.0, give_up - time.monotonic())))
        if stuck is not None and worker.is_alive() and stuck():
            break
    watched.elapsed = time.monotonic() - started
    watched.peak_bytes = max(0, tracemalloc.get_traced_memory()[1] - start_traced)
    if not tracing:
        tracemalloc.stop()
    sampling.set()
    sampler.join()
    highest[0] = max(highest[0], _rss())
    watched.rss_growth = highest[0] - baseline
    return watched


def any_stuck(outcomes: Sequence[TurnOutcome], bound: float) -> Callable[[], bool]:
    """For :func:`watch`: true once a turn of ``outcomes`` runs past ``bound`` + GRACE."""

    def stuck() -> bool:
        now = time.monotonic()
        return any(
            o.started is not None and not o.finished and now - o.started > bound + GRACE
            for o in list(outcomes)
        )

    return stuck


# --------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------

#: Validates a result; returns what is wrong with it.
Validator = Callable[[TurnResult, TurnOutcome], list[str]]


@dataclass
class Expect:
    """What a case may end in.

    ``answer`` validates a result (``None``: a result is wrong, the case must
    raise); ``errors`` are the exception types allowed (default: any
    :class:`NimpipeError`).
    """

    answer: Validator | None = None
    errors: tuple[type[BaseException], ...] = (NimpipeError,)


def tail(exc: BaseException, lines: int = 6) -> str:
    """The last lines of an exception's traceback, on one line each."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    kept = [line.rstrip() for line in text.strip().splitlines()][-lines:]
    return " | ".join(line.strip() for line in kept)


def judge_turn(outcome: TurnOutcome, expect: Expect, bound: float) -> list[str]:
    """What is wrong with how a turn ended (empty: it ended well)."""
    problems: list[str] = []
    if not outcome.finished:
        got = "".join(c for c in outcome.chunks if isinstance(c, str))
        problems.append(f"still running past {bound + GRACE:.1f} s ({len(got)} chars released)")
        return problems
    assert outcome.elapsed is not None
    if outcome.elapsed > bound:
        problems.append(f"took {outcome.elapsed:.2f} s, bound {bound:.2f} s")
    bad_chunks = [c for c in outcome.chunks if not isinstance(c, str)]
    if bad_chunks:
        problems.append(f"the consumer received non-text chunks: {bad_chunks[:3]!r}")
    if outcome.error is not None:
        exc = outcome.error
        if not isinstance(exc, NimpipeError):
            problems.append(f"bare {type(exc).__name__}: {str(exc)[:200]} [{tail(exc)}]")
        elif not isinstance(exc, expect.errors):
            allowed = ", ".join(t.__name__ for t in expect.errors) or "the answer"
            problems.append(f"{type(exc).__name__} ({str(exc)[:200]}), expected {allowed}")
        return problems
    result = outcome.result
    if result is None:
        problems.append("no TurnResult")
        return problems
    if expect.answer is None:
        problems.append(
            f"returned {outcome.describe()} {result.text[:80]!r}; expected a typed error"
        )
        return problems
    if not isinstance(result.text, str):
        problems.append(f"result.text is {type(result.text).__name__}")
        return problems
    if not isinstance(result.finish_reason, FinishReason):
        problems.append(f"finish reason {result.finish_reason!r} is not a FinishReason")
    if outcome.mode in STREAMING and result.blocked is None:
        released = "".join(c for c in outcome.chunks if isinstance(c, str))
        if released != result.text:
            problems.append(
                f"released text {_short(released)} differs from result.text {_short(result.text)}"
            )
    problems += expect.answer(result, outcome)
    return problems


def _short(text: str) -> str:
    return repr(text) if len(text) <= 90 else f"{text[:40]!r}...{text[-40:]!r} ({len(text)} chars)"


def answer_is(expected: str) -> Validator:
    """The result is not blocked and its text is ``expected``."""

    def validate(result: TurnResult, outcome: TurnOutcome) -> list[str]:
        if result.blocked is not None:
            return [f"blocked: {result.blocked.reason}"]
        if result.text != expected:
            return [f"text {_short(result.text)}, expected {_short(expected)}"]
        return []

    return validate


def sane_usage(result: TurnResult, outcome: TurnOutcome) -> list[str]:
    """The response's usage holds non-negative integers a ledger can store."""
    if result.response is None:
        return ["no response"]
    usage = result.response.usage
    problems = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(usage, name)
        if type(value) is not int or not 0 <= value <= MAX_TOKENS:
            problems.append(f"usage.{name} = {value!r} (source {usage.source})")
    return problems


def clean_text(result: TurnResult, outcome: TurnOutcome) -> list[str]:
    """The text and every chunk are valid Unicode (no lone surrogates): printable, storable."""
    problems = []
    for where, text in [("result.text", result.text)] + [
        (f"chunk {i}", c) for i, c in enumerate(outcome.chunks) if isinstance(c, str)
    ]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            problems.append(f"{where} is not valid text ({exc.reason} at {exc.start})")
    return problems


def all_of(*validators: Validator) -> Validator:
    def validate(result: TurnResult, outcome: TurnOutcome) -> list[str]:
        problems: list[str] = []
        for v in validators:
            problems += v(result, outcome)
        return problems

    return validate


def not_transient(exc: BaseException) -> bool:
    return not (isinstance(exc, ProviderError) and exc.transient)


# --------------------------------------------------------------------------
# A whole case: watch one turn, judge it, record the row
# --------------------------------------------------------------------------


def check_case(
    case: str,
    mode: str,
    pipeline: Any,
    make_turn: Callable[[], Turn],
    expect: Expect,
    *,
    deadline: float | None,
    bound: float | None = None,
    memory_mb: float = 64,
    recorder: Recorder | None = None,
    cancel: Any = None,
    extra: Callable[[TurnOutcome], list[str]] | None = None,
) -> Row:
    """Run one turn of ``case`` in ``mode``, judge it and add its row to the summary."""
    if bound is None:
        assert deadline is not None
        bound = deadline + SLACK
    outcome = TurnOutcome(mode)
    watched = watch(
        lambda: run_turn(pipeline, mode, make_turn, cancel=cancel, outcome=outcome),
        bound + GRACE,
        name=f"hostile-{case}-{mode}",
    )
    if not watched.finished:
        outcome.stop()
    problems = judge_turn(outcome, expect, bound)
    peak_mb = watched.peak_bytes / MB
    if peak_mb > memory_mb:
        problems.append(f"peak memory {peak_mb:.0f} MB, bound {memory_mb:.0f} MB")
    if recorder is not None:
        problems += record_problems(recorder.records)
    if extra is not None and outcome.finished:
        problems += extra(outcome)
    row = Row(
        case=case,
        mode=mode,
        ok=not problems,
        outcome=outcome.describe(),
        elapsed=outcome.elapsed,
        deadline=deadline,
        bound=bound,
        peak_mb=peak_mb,
        rss_mb=watched.rss_growth / MB,
        problems=problems,
    )
    ROWS.append(row)
    return row


def add_row(
    case: str,
    mode: str,
    problems: list[str],
    *,
    outcome: str,
    elapsed: float | None,
    deadline: float | None,
    bound: float | None,
    watched: Watched | None = None,
) -> Row:
    """Record a row for a case judged by hand (multi-turn flows, subprocess cases)."""
    row = Row(
        case=case,
        mode=mode,
        ok=not problems,
        outcome=outcome,
        elapsed=elapsed,
        deadline=deadline,
        bound=bound,
        peak_mb=(watched.peak_bytes / MB) if watched else 0.0,
        rss_mb=(watched.rss_growth / MB) if watched else 0.0,
        problems=list(problems),
    )
    ROWS.append(row)
    return row


def fail_message(row: Row) -> str:
    return f"{row.case} [{row.mode}]: " + "; ".join(row.problems)
