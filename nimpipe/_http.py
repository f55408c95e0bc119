"""HTTP for model calls: pooled clients, an absolute deadline, bounded replies.

A model call has two clocks.  The turn's deadline is absolute: no server can
stretch it by sending one byte at a time or SSE keep-alive comments.  The
route's timeout is an idle limit: a streamed reply must make progress (a data
event) at least that often, a plain reply must arrive whole within it.

Replies are read in pieces, so every piece is checked against both clocks and
against the size limits.  Under ``run``/``stream`` every socket read and write
is capped by the time left (:func:`deadline_of`); under ``arun``/``astream``
every read is awaited with that bound.

httpx is imported on first use, never at import time.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
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

    def head_deadline(self) -> float:
        """When the reply's head must have arrived: within the idle limit and the deadline."""
        limit = self.last_progress + self.idle
        return limit if self.deadline is None else min(limit, self.deadline)

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def deadline_error(self) -> DeadlineExceededError:
        return DeadlineExceededError(
            f"turn {self.turn_id} ran past its deadline", turn_id=self.turn_id
        )


#: The deadline (monotonic) and cancel token of the blocking call running on this thread.
_blocking = threading.local()


@contextlib.contextmanager
def deadline_of(deadline: float | None) -> Iterator[None]:
    """While inside, every socket read and write of this thread ends by ``deadline``."""
    previous = getattr(_blocking, "deadline", None)
    _blocking.deadline = deadline
    try:
        yield
    finally:
        _blocking.deadline = previous


#: How often a blocking read under a cancel token looks at the token.
_CANCEL_SLICE = 0.05


@contextlib.contextmanager
def cancel_of(cancel: Any) -> Iterator[None]:
    """While inside, a blocking read of this thread ends soon after ``cancel`` is cancelled."""
    previous = getattr(_blocking, "cancel", None)
    _blocking.cancel = cancel
    try:
        yield
    finally:
        _blocking.cancel = previous


def _cancelled(cancel: Any) -> BaseException:
    from nimpipe.errors import CancelledError

    return CancelledError("turn cancelled while waiting for the server")


def _capped(timeout: float | None) -> float | None:
    deadline = getattr(_blocking, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        import httpcore

        raise httpcore.ReadTimeout("the turn's deadline has passed")
    return left if timeout is None else min(timeout, left)


def _deadline_backend() -> Any:
    """httpcore's blocking network backend, with every read and write capped by the deadline.

    A per-read timeout alone restarts with every byte, so a server sending its
    head or body one byte at a time would hold a blocking call for ever.
    """
    import httpcore

    class Stream(httpcore.NetworkStream):
        def __init__(self, inner: httpcore.NetworkStream) -> None:
            self._inner = inner

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            cancel = getattr(_blocking, "cancel", None)
            if cancel is None:
                return self._inner.read(max_bytes, _capped(timeout))
            # A cancel token is watched: wait in short slices so that a cancel
            # from another thread ends the read within one slice.
            limit = None if timeout is None else time.monotonic() + timeout
            while True:
                wait = _capped(None if limit is None else max(limit - time.monotonic(), 0.0))
                try:
                    return self._inner.read(
                        max_bytes, _CANCEL_SLICE if wait is None else min(wait, _CANCEL_SLICE)
                    )
                except httpcore.ReadTimeout:
                    if cancel.cancelled:
                        raise _cancelled(cancel) from None
                    if limit is not None and time.monotonic() >= limit:
                        raise

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._inner.write(buffer, _capped(timeout))

        def close(self) -> None:
            self._inner.close()

        def start_tls(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
            return Stream(self._inner.start_tls(*args, **kwargs))

        def get_extra_info(self, info: str) -> Any:
            return self._inner.get_extra_info(info)

    class Backend(httpcore.SyncBackend):
        def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
            return Stream(super().connect_tcp(*args, **kwargs))

        def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
            return Stream(super().connect_unix_socket(*args, **kwargs))

    return Backend()


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
        self._tls_context: ssl.SSLContext | None = None

    @staticmethod
    def _limits() -> httpx.Limits:
        import httpx

        return httpx.Limits(max_connections=256, max_keepalive_connections=64)

    def _tls(self) -> ssl.SSLContext:
        """One TLS context for every client: loading the CA bundle takes tens of milliseconds."""
        context = self._tls_context
        if context is None:
            import httpx

            context = self._tls_context = httpx.create_ssl_context()
        return context

    def sync(self) -> httpx.Client:
        client = self._sync
        if client is None:
            with self._lock:
                client = self._sync
                if client is None:
                    import httpx

                    transport = httpx.HTTPTransport(limits=self._limits(), verify=self._tls())
                    # httpx offers no setting for the network backend of its pool.
                    transport._pool._network_backend = _deadline_backend()
                    client = self._sync = httpx.Client(transport=transport)
        return client

    async def for_loop(self) -> httpx.AsyncClient:
        import asyncio

        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            import httpx

            client = self._async[loop] = httpx.AsyncClient(
                limits=self._limits(), verify=self._tls()
            )
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
    pieces = response.iter_bytes()
    size = 0
    while True:
        try:
            with deadline_of(clock.deadline):
                piece = next(pieces, None)
        except Exception:
            if clock.deadline_passed():
                raise clock.deadline_error() from None
            raise
        if piece is None:
            return
        size += len(piece)
        if size > limit:
            raise MalformedReplyError(f"reply larger than {limit} bytes", route=route)
        clock.check(route)
        yield piece


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
