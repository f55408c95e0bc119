"""Serving a NIM test server's aiohttp application on a socket, and stopping it cleanly."""

from __future__ import annotations

import asyncio
import socket
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nimpipe.testing.nim_server.app import build_app
from nimpipe.testing.nim_server.replies import dumps, error_body
from nimpipe.testing.nim_server.state import ServerState

__all__ = ["Serving"]

_BACKLOG = 1024
#: Seconds a request still being answered gets when the server stops, before
#: it is cancelled (aiohttp waits without limit for a timeout of 0).
_STOP_GRACE = 0.05
#: Options of each connection: no access log (it costs per request), request
#: lines and header lines up to 1 MiB (aiohttp's 8 KiB is below what some tests
#: send).
_CONNECTION_OPTIONS: dict[str, Any] = {
    "access_log": None,
    "max_line_size": 1 << 20,
    "max_field_size": 1 << 20,
}


class _Connection(web.RequestHandler):
    """aiohttp's connection protocol, answering a request it cannot parse as a NIM would.

    aiohttp answers such a request in HTTP/1.0 (the version is unknown) with
    a text body; clients of this server get what they get from every other
    error: an HTTP/1.1 status line and an OpenAI-style JSON error, then the
    connection closes.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        transport = self.transport
        if not isinstance(exc, HttpProcessingError) or transport is None:
            return super().handle_error(request, status, exc, message)
        body = dumps(error_body(status, message or str(exc)))
        head = (
            f"HTTP/1.1 {status} {_phrase(status)}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        )
        transport.write(head.encode("latin-1") + body)
        transport.close()
        # aiohttp finds the transport closed and sends nothing of this one.
        placeholder = web.Response()
        placeholder.force_close()
        return placeholder


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Serving:
    """The application of one :class:`ServerState`, served on one listening socket."""

    def __init__(self, runner: web.AppRunner, listener: asyncio.Server, port: int):
        self._runner = runner
        self._listener = listener
        #: The TCP port listened on.
        self.port = port

    @classmethod
    async def start(cls, state: ServerState, host: str, port: int) -> Serving:
        """Listen on ``host:port`` (0: a free port) and serve ``state``."""
        loop = asyncio.get_running_loop()
        runner = web.AppRunner(
            build_app(state),
            handle_signals=False,
            # A handler learns that its client went away by being cancelled,
            # which is how a stall ends when the client gives up.
            handler_cancellation=True,
            shutdown_timeout=_STOP_GRACE,
            **_CONNECTION_OPTIONS,
        )
        await runner.setup()
        manager = runner.server
        assert manager is not None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock: socket.socket | None = None
        try:
            # The listening socket is ours, so that stopping can stop accepting first.
            sock = socket.create_server((host, port), family=family, backlog=_BACKLOG)
            listener = await loop.create_server(
                lambda: _Connection(manager, loop=loop, **_CONNECTION_OPTIONS),
                sock=sock,
                backlog=_BACKLOG,
            )
        except BaseException:
            if sock is not None:
                sock.close()
            await runner.cleanup()
            raise
        return cls(runner, listener, sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting, end every connection (cancelling what is still answered)."""
        loop = asyncio.get_running_loop()
        # Stop accepting, then let connections accepted in the meantime reach
        # aiohttp while the server is still open: asyncio cannot attach a
        # connection to a closed server, and such a connection leaks its socket.
        for sock in self._listener.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(5):
            await asyncio.sleep(0)
        self._listener.close()
        await self._runner.cleanup()
        # The loop belongs to this server, so every other task on it serves a
        # connection.
        current = asyncio.current_task()
        while True:
            others = [t for t in asyncio.all_tasks() if t is not current]
            if not others:
                break
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        await self._listener.wait_closed()
        # Closed transports release their sockets in callbacks scheduled on this loop.
        for _ in range(3):
            await asyncio.sleep(0)
