"""Writing one answer with aiohttp, shaped by the fault that applies to it.

Faults that break HTTP on purpose (a body or stream cut short, a stall, a
dropped connection) write through :class:`aiohttp.web.StreamResponse` and
then close the request's transport, so the client sees exactly the broken
message and a closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from nimpipe.testing.nim_server.faults import Fault
from nimpipe.testing.nim_server.records import Incoming
from nimpipe.testing.nim_server.replies import dumps, error_body

__all__ = ["Exchange"]

_SSE_HEADERS = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
)


class Exchange:
    """The answer to one request: what was asked, the fault taken for it, how it ends.

    Every ``send*`` method and :meth:`stream` returns the response the
    handler returns.  ``keep_alive = False`` makes the answer close the
    connection.  ``started`` tells whether headers went out already (no other
    answer can follow), ``hung_up`` whether the answer was left unfinished.
    """

    __slots__ = ("fault", "hung_up", "incoming", "keep_alive", "request", "started")

    def __init__(self, request: web.BaseRequest, incoming: Incoming, fault: Fault | None) -> None:
        self.request = request
        self.incoming = incoming
        self.fault = fault
        self.keep_alive = True
        self.started = False
        self.hung_up = False

    def _fault_param(self, kind: str, name: str, default: Any) -> Any:
        return None if self.fault is None else self.fault.param(kind, name, default)

    async def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> web.StreamResponse:
        """A whole answer; a ``cut_stream`` fault sends part of the body, then hangs up."""
        all_headers = CIMultiDict([("Content-Type", content_type), *headers])
        fraction = self._fault_param("cut_stream", "fraction", 0.5)
        if fraction is not None:
            cut = max(0, min(len(body) - 1, int(len(body) * float(fraction))))
            partial = web.StreamResponse(status=status, headers=all_headers)
            partial.content_length = len(body)
            self.started = True
            await partial.prepare(self.request)
            if cut:
                await partial.write(body[:cut])
            return self.hang_up()
        response = web.Response(status=status, body=body, headers=all_headers)
        if not self.keep_alive:
            response.force_close()
        return response

    async def send_json(
        self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()
    ) -> web.StreamResponse:
        """A JSON answer."""
        return await self.send(status, dumps(obj), headers=headers)

    async def send_error(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> web.StreamResponse:
        """An OpenAI-style JSON error."""
        return await self.send_json(status, error_body(status, message, error_type), headers)

    async def stream(self, events: AsyncGenerator[bytes, None]) -> web.StreamResponse:
        """Send each of ``events`` as an SSE ``data:`` event, one HTTP chunk each.

        The headers go out at once, before the first event is made.  A
        ``cut_stream`` fault hangs up after ``chunks`` events (or at the end
        of a shorter stream); a ``stall`` fault with ``after_chunks`` stalls
        after that many.
        """
        response = web.StreamResponse(headers=CIMultiDict(_SSE_HEADERS))
        if not self.keep_alive:
            response.force_close()
        self.started = True
        await response.prepare(self.request)
        cut_after = self._fault_param("cut_stream", "chunks", 2)
        stall_after = self._fault_param("stall", "after_chunks", None)
        sent = 0
        async with contextlib.aclosing(events):
            async for payload in events:
                await response.write(b"data: " + payload + b"\n\n")
                sent += 1
                if cut_after is not None and sent >= int(cut_after):
                    return self.hang_up()
                if stall_after is not None and sent >= int(stall_after):
                    return await self.stall()
        if cut_after is not None:
            return self.hang_up()
        await response.write_eof()
        return response

    async def stall(self) -> web.StreamResponse:
        """Answer nothing more until ``stall_seconds`` elapse, then hang up.

        Without ``stall_seconds`` this waits until the client goes away, which
        cancels the handler (the server runs with handler cancellation).
        """
        seconds = self._fault_param("stall", "stall_seconds", None)
        if seconds is None:
            await asyncio.Event().wait()  # never set
        else:
            await asyncio.sleep(float(seconds))
        return self.hang_up()

    def hang_up(self) -> web.StreamResponse:
        """Close the connection after what was written, leaving any answer unfinished.

        Returns a response for the handler to return: aiohttp finds the
        transport closed, sends nothing more and drops the connection.
        """
        self.hung_up = True
        transport = self.request.transport
        if transport is not None:
            transport.close()
        placeholder = web.Response()
        placeholder.force_close()
        return placeholder
