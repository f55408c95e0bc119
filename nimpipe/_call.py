"""The call layer: one model call on one route, with its transport retries.

:func:`call` yields what happened, in order, and decides nothing else: raw
text chunks, a :class:`Tried` for every failed try (the turn runner records
it), an :class:`Aborted` when a deferred input check blocks or the turn is
cancelled, and last the :class:`~nimpipe.types.Response`.  A failure that is
not retried is raised after its :class:`Tried`.  It never calls a hook: what
to release, what to record and what to do next belong to the turn runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe import _sync
from nimpipe._http import cancel_of
from nimpipe.errors import (
    BlockedError,
    CancelledError,
    DeadlineExceededError,
    NimpipeError,
    ProviderError,
)
from nimpipe.provider import OpenAIProvider
from nimpipe.stage import NO_STREAM
from nimpipe.types import Block, Deferred, Response, Route, Turn

if TYPE_CHECKING:
    from nimpipe.plugins import Resolver

__all__ = ["Aborted", "CallEvent", "Mode", "Tried", "call", "check_turn", "stamp"]


@attrs.frozen
class Mode:
    """Sync or async: the only place the two modes differ."""

    provider: OpenAIProvider
    is_async: bool
    resolve: Resolver

    async def complete(
        self, route: Route, turn: Turn, timeout: float, cancel: Any = None
    ) -> Response:
        """One plain call; a blocking one ends soon after ``cancel`` fires."""
        if self.is_async:
            remaining = turn.remaining()
            request = self.provider.acomplete(route, turn, timeout)
            if remaining is None:
                return await request
            try:
                return await asyncio.wait_for(request, max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise DeadlineExceededError(
                    f"turn {turn.id} ran past its deadline", turn_id=turn.id
                ) from None
        with cancel_of(cancel):
            return self.provider.complete(route, turn, timeout)

    def stream(
        self, route: Route, turn: Turn, timeout: float, cancel: Any = None
    ) -> AsyncIterator[str | Response]:
        if self.is_async:
            return self.provider.astream(route, turn, timeout)
        return _sync.SyncIter(self.provider.stream(route, turn, timeout), cancel)

    async def sleep(self, seconds: float) -> None:
        if self.is_async:
            await asyncio.sleep(seconds)
        else:
            time.sleep(seconds)


@attrs.frozen
class Tried:
    """A try that failed: its error, when it started, the text it had streamed."""

    error: ProviderError
    started: float
    partial: str
    #: Whether another try follows (the record's outcome is ``retried``, else ``error``).
    retrying: bool


@attrs.frozen
class Aborted:
    """The call was cut short: by a deferred check's ``block``, or by cancellation."""

    outcome: str
    reason: str
    started: float
    partial: str
    block: Block | None = None


#: What :func:`call` yields.
CallEvent = str | Tried | Aborted | Response


def stamp(decision: Any, plugin: str) -> Any:
    """Fill in the deciding plugin's name on a decision that lacks it."""
    if hasattr(decision, "plugin") and not decision.plugin:
        return attrs.evolve(decision, plugin=plugin)
    return decision


def check_turn(turn: Turn, cancel: Any) -> None:
    """Raise when the turn was cancelled or ran past its deadline."""
    if cancel is not None and cancel.cancelled:
        raise CancelledError(turn_id=turn.id)
    remaining = turn.remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceededError(f"turn {turn.id} ran past its deadline", turn_id=turn.id)


def backoff(tries: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's ``Retry-After``, else jittered exponential."""
    if retry_after is not None and retry_after == retry_after:  # not NaN
        return max(0.0, retry_after)
    return min(8.0, 0.25 * (2**tries)) * (0.5 + random.random() / 2)


def _timeout(turn: Turn, route: Route) -> float:
    remaining = turn.remaining()
    if remaining is None:
        return route.timeout
    if remaining <= 0:
        raise DeadlineExceededError(f"turn {turn.id} ran past its deadline", turn_id=turn.id)
    return min(route.timeout, remaining)


def finished_block(
    checks: Sequence[asyncio.Future[Any]], deferred: Sequence[Deferred]
) -> Block | None:
    """The first block among the deferred checks that have finished."""
    for task, d in zip(checks, deferred, strict=True):
        if task.done():
            result = task.result()
            if isinstance(result, Block):
                return stamp(result, d.plugin)
    return None


async def _await_checks(
    checks: Sequence[asyncio.Future[Any]], deferred: Sequence[Deferred]
) -> Block | None:
    for task in checks:
        if not task.done():
            await asyncio.wait([task])
    return finished_block(checks, deferred)


async def run_deferred(check: Deferred, mode: Mode) -> Block | None:
    """Run one deferred input check to its end (sync mode runs them before the call)."""
    try:
        result = await mode.resolve(check.check())
    except BlockedError as exc:
        return exc.block
    if result is None:
        return None
    if not isinstance(result, Block):
        raise NimpipeError(f"deferred check {check.name!r} of {check.plugin!r} returned {result!r}")
    return stamp(result, check.plugin)


async def _race(
    items: AsyncIterator[str | Response],
    checks: Sequence[asyncio.Future[Any]],
    deferred: Sequence[Deferred],
) -> AsyncGenerator[str | Response | Block, None]:
    """Stream ``items``, but stop with the :class:`Block` as soon as a deferred check blocks.

    The wait for the next chunk races the checks, so a blocked input stops the
    call without waiting for the model's first token.
    """
    iterator = items.__aiter__()
    next_item: asyncio.Future[Any] | None = None
    try:
        while True:
            if next_item is None:
                next_item = asyncio.ensure_future(iterator.__anext__())
            waiting = [c for c in checks if not c.done()]
            if waiting:
                await asyncio.wait({next_item, *waiting}, return_when=asyncio.FIRST_COMPLETED)
            block = finished_block(checks, deferred)
            if block is not None:
                yield block
                return
            if not next_item.done():
                if waiting:
                    continue
                # Every check has passed: only the next chunk is left to wait for.
                await asyncio.wait({next_item})
            try:
                item = next_item.result()
            except StopAsyncIteration:
                return
            next_item = None
            yield item
    finally:
        if next_item is not None and not next_item.done():
            next_item.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await next_item
        closing = getattr(iterator, "aclose", None)
        if closing is not None:
            with contextlib.suppress(Exception):
                await closing()


async def _complete_racing(
    turn: Turn,
    route: Route,
    timeout: float,
    mode: Mode,
    checks: Sequence[asyncio.Future[Any]],
    deferred: Sequence[Deferred],
) -> Response | Block:
    request = asyncio.ensure_future(mode.complete(route, turn, timeout))
    pending: set[asyncio.Future[Any]] = {request, *checks}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            block = finished_block(checks, deferred)
            if block is not None:
                return block
            if request in done:
                block = await _await_checks(checks, deferred)
                return block if block is not None else request.result()
    finally:
        if not request.done():
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await request


async def call(
    turn: Turn,
    route: Route,
    mode: Mode,
    cancel: Any,
    *,
    streaming: bool,
    deferred: tuple[Deferred, ...],
    resend_safe: bool,
    released: Sequence[str],
    max_retry_wait: float,
) -> AsyncGenerator[CallEvent, None]:
    """One model call with transport retries (see the module docstring).

    :param resend_safe: whether text streamed so far is still held back, so a
        retry cannot show it twice; even then, once ``released`` grows during
        a try, that try is not retried.
    :param released: the text the turn has released to the caller so far (read only).
    """
    checks = [asyncio.ensure_future(mode.resolve(d.check())) for d in deferred]
    tries = 0
    try:
        while True:
            timeout = _timeout(turn, route)
            started = time.time()
            partial: list[str] = []
            released_before = len(released)
            try:
                if streaming and NO_STREAM not in route.flags:
                    raw = mode.stream(route, turn, timeout, cancel)
                    items = _race(raw, checks, deferred) if checks else raw
                    async for item in items:
                        check_turn(turn, cancel)
                        if isinstance(item, Block):
                            yield Aborted("cancelled", item.reason, started, "".join(partial), item)
                            return
                        if isinstance(item, Response):
                            block = await _await_checks(checks, deferred) if checks else None
                            if block is not None:
                                text = "".join(partial)
                                yield Aborted("cancelled", block.reason, started, text, block)
                            else:
                                yield item
                            return
                        partial.append(item)
                        yield item
                    return
                if checks:
                    outcome = await _complete_racing(turn, route, timeout, mode, checks, deferred)
                    if isinstance(outcome, Block):
                        yield Aborted("cancelled", "input blocked", started, "", outcome)
                        return
                    response = outcome
                else:
                    response = await mode.complete(route, turn, timeout, cancel)
                yield response
                return
            except ProviderError as exc:
                # Text the caller already has cannot be taken back: a retry
                # would send it twice (unheld streams, released sentences).
                shown = bool(partial) and (not resend_safe or len(released) > released_before)
                retrying = exc.transient and tries < route.max_retries and not shown
                delay = backoff(tries, exc.retry_after) if retrying else 0.0
                remaining = turn.remaining()
                if retrying and (
                    delay > max_retry_wait or (remaining is not None and delay >= remaining)
                ):
                    retrying = False
                yield Tried(exc, started, "".join(partial), retrying)
                if not retrying:
                    raise
                tries += 1
                await mode.sleep(delay)
                check_turn(turn, cancel)
            except (CancelledError, DeadlineExceededError, asyncio.CancelledError) as exc:
                yield Aborted("cancelled", type(exc).__name__, started, "".join(partial))
                raise
    finally:
        for task in checks:
            if not task.done():
                task.cancel()
