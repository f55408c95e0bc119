"""HTTP for model calls: pooled clients, an absolute deadline, bounded replies.

A model call has two clocks.  The turn's deadline is absolute: no server can
stretch it by sending one byte at a time or SSE keep-alive comments.  The
route's timeout is an idle limit: a streamed reply must make progress (a data
event) at least that often, a plain reply must arrive whole within it.

Replies are read in pieces, so every piece is checked against both clocks and
against the size limits.  Under ``run``/``stream`` a blocking read cannot be
interrupted by a timer in the same thread, so a shared watchdog thread shuts
the socket down when the turn's deadline passes.

httpx is imported on first use, never at import time.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from nimpipe.errors import DeadlineExceededError, MalformedReplyError, TimeoutError

if TYPE_CHECKING:
    import asyncio

    import httpx

    from nimpipe.types import Route

__all__ = [
    "MAX_EVENT_BYTES",
    "MAX_REPLY_BYTES",
    "Clients",
    "Clock",
    "SSEParser",
]

#: A reply larger than this is refused as malformed (no completion is this large).
MAX_REPLY_BYTES = 32 * 2**20
#: One server-sent event larger than this is refused as malformed.
MAX_EVENT_BYTES = 8 * 2**20
#: How much of an error reply's body is read.
MAX_ERROR_BYTES = 64 * 2**10


class Clock:
    """The two limits of one call: the turn's absolute deadline and the idle timeout."""

    __slots__ = ("deadline", "idle", "last_progress", "turn_id")

    def __init__(self, idle: float, remaining: float | None, turn_id: str | None) -> None:
        now = time.monotonic()
        self.idle = idle
        self.deadline = None if remaining is None else now + remaining
        self.last_progress = now
        self.turn_id = turn_id

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def wait_limit(self) -> float:
        """Seconds the next read may wait (at least a millisecond)."""
        now = time.monotonic()
        limit = self.last_progress + self.idle - now
        if self.deadline is not None:
            limit = min(limit, self.deadline - now)
        return max(limit, 0.001)

    def check(self, route: Route) -> None:
        """Raise when either limit has passed."""
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise self.deadline_error()
        if now - self.last_progress >= self.idle:
            raise TimeoutError(
                f"no progress for {self.idle:g} s (the route's timeout)", route=route
            )

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def deadline_error(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"turn {self.turn_id} ran past its deadline", turn_id=self.turn_id
        )


class _Watchdog:
    """One daemon thread that runs actions at their time; used to cut blocking reads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, action: Callable[[], None]) -> list[Any]:
        """Run ``action`` at monotonic time ``when``; returns a handle for :meth:`cancel`."""
        entry = [when, next(self._seq), action]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nimpipe-deadlines", daemon=True
                )
                self._thread.start()
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    @staticmethod
    def cancel(entry: list[Any]) -> None:
        entry[2] = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when = self._heap[0][0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                action = heapq.heappop(self._heap)[2]
            if action is not None:
                with contextlib.suppress(Exception):  # the socket may already be gone
                    action()


_watchdog = _Watchdog()


def _socket_of(response: httpx.Response) -> socket.socket | None:
    stream = response.extensions.get("network_stream")
    if stream is None:
        return None
    try:
        sock = stream.get_extra_info("socket")
    except Exception:
        return None
    return sock if isinstance(sock, socket.socket) else None


class Clients:
    """One pooled httpx client for blocking calls and one per event loop for async calls.

    httpx pools connections per origin, so every route shares a client;
    headers and timeouts go with each request.
    """

    def __init__(self) -> None:
        self._sync: httpx.Client | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )
        self._parked: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    @staticmethod
    def _limits() -> httpx.Limits:
        import httpx

        return httpx.Limits(max_connections=256, max_keepalive_connections=64)

    def sync(self) -> httpx.Client:
        client = self._sync
        if client is None:
            with self._lock:
                client = self._sync
                if client is None:
                    import httpx

                    client = self._sync = httpx.Client(limits=self._limits())
        return client

    async def for_loop(self) -> httpx.AsyncClient:
        import asyncio

        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            import httpx

            client = self._async[loop] = httpx.AsyncClient(limits=self._limits())
            # Parked for the loop's life: the loop closes the client when it
            # finalises its async generators (as asyncio.run does at the end).
            parked = self._parked[loop] = _close_on_shutdown(client)
            await parked.asend(None)
        return client

    def close(self) -> None:
        with self._lock:
            client, self._sync = self._sync, None
        if client is not None:
            client.close()


async def _close_on_shutdown(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    try:
        yield
        yield
    finally:
        with contextlib.suppress(Exception):  # closing on shutdown is best effort
            await client.aclose()


def timeout_for(route: Route, clock: Clock) -> httpx.Timeout:
    import httpx

    wait = clock.wait_limit()
    return httpx.Timeout(wait, connect=min(route.connect_timeout, wait))


def iter_body(response: httpx.Response, clock: Clock, route: Route, limit: int) -> Iterator[bytes]:
    """The body of a blocking response in pieces, within the clock and ``limit`` bytes."""
    cut = None
    sock = _socket_of(response)
    if clock.deadline is not None and sock is not None:
        cut = _watchdog.schedule(clock.deadline, lambda: sock.shutdown(socket.SHUT_RDWR))
    size = 0
    try:
        for piece in response.iter_bytes():
            size += len(piece)
            if size > limit:
                raise MalformedReplyError(f"reply larger than {limit} bytes", route=route)
            clock.check(route)
            yield piece
    except Exception:
        if clock.deadline_passed():
            raise clock.deadline_error() from None
        raise
    finally:
        if cut is not None:
            _watchdog.cancel(cut)


async def aiter_body(
    response: httpx.Response, clock: Clock, route: Route, limit: int
) -> AsyncIterator[bytes]:
    """The body of an async response in pieces, each read bounded by the clock."""
    import asyncio

    pieces = response.aiter_bytes().__aiter__()
    size = 0
    while True:
        try:
            piece = await asyncio.wait_for(pieces.__anext__(), clock.wait_limit())
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            clock.check(route)
            raise TimeoutError("no answer within the timeout", route=route) from None
        size += len(piece)
        if size > limit:
            raise MalformedReplyError(f"reply larger than {limit} bytes", route=route)
        clock.check(route)
        yield piece


class SSEParser:
    """Incremental server-sent events: feed bytes, get each event's ``data`` as text.

    Comments (keep-alive lines starting with ``:``) and ``event:``/``id:``
    fields are skipped; an event larger than :data:`MAX_EVENT_BYTES` is refused.
    """

    __slots__ = ("_buffer", "_data", "route")

    def __init__(self, route: Route) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self.route = route

    def feed(self, piece: bytes) -> list[str]:
        buffer = self._buffer + piece if self._buffer else piece
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise MalformedReplyError(
                f"a streamed event is larger than {MAX_EVENT_BYTES} bytes", route=self.route
            )
        events: list[str] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(self._decode(b"\n".join(self._data)))
                    self._data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events

    def close(self) -> list[str]:
        """The last event, if the stream ended without its blank line."""
        events = self.feed(b"\n\n") if (self._buffer or self._data) else []
        return events

    def _decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedReplyError(
                f"streamed event is not UTF-8: {exc}", route=self.route
            ) from None
