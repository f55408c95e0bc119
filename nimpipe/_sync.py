"""Running the pipeline's coroutines without an event loop.

The pipeline is written once, as coroutines.  :meth:`Pipeline.arun` awaits
them on the caller's loop.  :meth:`Pipeline.run` drives them by hand: in
synchronous mode every await inside the pipeline completes without
suspending (model calls use the blocking client), so one ``send(None)`` runs a
coroutine to the end at almost no cost.  Coroutines that plugins return are
the exception: :func:`resolve_blocking` runs them to completion on a private
event loop owned by the calling thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_local = threading.local()


class _ThreadLoop:
    """A thread's private event loop, closed when the thread ends."""

    __slots__ = ("loop",)

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        if not self.loop.is_closed() and not self.loop.is_running():
            self.loop.close()


def _thread_loop() -> asyncio.AbstractEventLoop:
    holder: _ThreadLoop | None = getattr(_local, "holder", None)
    if holder is None or holder.loop.is_closed():
        holder = _ThreadLoop()
        _local.holder = holder
    return holder.loop


def in_running_loop() -> bool:
    """Whether the calling thread is inside a running asyncio event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def resolve_blocking(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` to completion on this thread's private loop (sync mode)."""
    loop = _thread_loop()

    async def _await() -> T:
        return await awaitable

    return loop.run_until_complete(_await())


async def resolve_async(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` on the running loop (async mode)."""
    return await awaitable


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends; return its result."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return,unused-ignore]
    coro.close()
    raise RuntimeError(
        "a nimpipe coroutine suspended in synchronous mode; an awaitable was "
        "awaited directly instead of through the pipeline's resolver"
    )


def drive_iter(agen: AsyncGenerator[T, None]) -> Iterator[T]:
    """Iterate an async generator that never suspends, synchronously.

    Closing the returned iterator early closes the async generator too, so
    its ``finally`` blocks run (and close the HTTP response in flight).
    """
    try:
        while True:
            step = agen.__anext__()
            try:
                step.send(None)
            except StopIteration as item:
                yield item.value
                continue
            except StopAsyncIteration:
                return
            step.close()
            raise RuntimeError("a nimpipe stream suspended in synchronous mode")
    finally:
        closing = agen.aclose()
        try:
            closing.send(None)
        except (StopIteration, StopAsyncIteration):
            pass
        else:  # pragma: no cover - a finally block that suspends is a bug
            closing.close()


class SyncIter:
    """An async iterator over a blocking iterator; each step completes at once.

    With a ``cancel`` token, each step's blocking reads end soon after it fires.
    """

    __slots__ = ("_cancel", "_it")

    def __init__(self, iterator: Iterator[T], cancel: Any = None) -> None:
        self._it = iterator
        self._cancel = cancel

    def __aiter__(self) -> SyncIter:
        return self

    async def __anext__(self) -> Any:
        try:
            if self._cancel is None:
                return next(self._it)
            from nimpipe._http import cancel_of

            with cancel_of(self._cancel):
                return next(self._it)
        except StopIteration:
            raise StopAsyncIteration from None
