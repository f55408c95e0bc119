"""NimServer: a NIM test server run by aiohttp in a daemon thread, and its control API."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nimpipe.testing.nim_server.faults import Fault
from nimpipe.testing.nim_server.records import RecordedRequest
from nimpipe.testing.nim_server.settings import CHAT_PATH, NimSettings
from nimpipe.testing.nim_server.state import ServerState

if TYPE_CHECKING:
    import asyncio

__all__ = ["NimServer", "closed_port_url"]


class NimServer:
    """A NIM-shaped HTTP server on 127.0.0.1, in a daemon thread of this process.

    ``NimServer(**settings)`` takes the fields of :class:`NimSettings` as
    keywords, plus ``host`` and ``port`` (0, the default, picks a free port).
    :meth:`start` returns once the server listens; :meth:`stop` closes it and
    every open connection.  Use it as a context manager::

        with NimServer(latency=0.01) as srv:
            client = openai.OpenAI(base_url=srv.base_url, api_key="x")

    A stopped server can be started again; it then listens on the same port.
    Every method is thread-safe.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> None:
        self.host = host
        self._bind_port = port
        self._state = ServerState(NimSettings().evolve(**settings))
        self._stop_event: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 10.0) -> NimServer:
        """Start serving in a daemon thread; returns ``self`` once listening."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("NimServer is already running")
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.serve_forever(on_ready=lambda _: started.set())
            except BaseException as exc:  # reported to the thread calling start()
                errors.append(exc)
            finally:
                started.set()

        self._thread = threading.Thread(target=run, name=f"NimServer-{id(self):x}", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise RuntimeError(f"NimServer did not start within {timeout} s")
        if errors:
            self._thread.join()
            raise errors[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close every connection; a no-op when not running."""
        loop, event, thread = self._state.loop, self._stop_event, self._thread
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(event.set)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"NimServer did not stop within {timeout} s")
            self._thread = None

    def __enter__(self) -> NimServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def serve_forever(
        self,
        *,
        on_ready: Callable[[NimServer], None] | None = None,
        handle_signals: bool = False,
    ) -> None:
        """Serve in the calling thread until :meth:`stop` (or SIGTERM/SIGINT).

        ``on_ready`` is called with the server once it listens.  With
        ``handle_signals`` (main thread only) SIGTERM and SIGINT stop it.
        """
        import asyncio

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(loop, on_ready, handle_signals))
        finally:
            self._state.loop = None
            self._stop_event = None
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        on_ready: Callable[[NimServer], None] | None,
        handle_signals: bool,
    ) -> None:
        import asyncio

        from nimpipe.testing.nim_server.runner import Serving

        stop_event = asyncio.Event()
        serving = await Serving.start(self._state, self.host, self._bind_port)
        self._port = self._bind_port = serving.port
        self._state.listening()
        self._state.loop = loop
        self._stop_event = stop_event
        if handle_signals:
            import signal

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop_event.set)
        try:
            if on_ready is not None:
                on_ready(self)
            await stop_event.wait()
        finally:
            await serving.stop()

    # -- addresses ---------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port; known once the server has started."""
        if self._port is None:
            raise RuntimeError("NimServer has not been started")
        return self._port

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (where ``/tokenize``, ``/metrics`` and ``/_admin`` live)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, the OpenAI-compatible base URL."""
        return f"{self.root_url}/v1"

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "not started"
        return f"<NimServer {where} models={list(self._state.models)}>"

    # -- control -----------------------------------------------------------

    @property
    def settings(self) -> NimSettings:
        """The current settings."""
        return self._state.settings

    def configure(self, **settings: Any) -> NimSettings:
        """Change settings (fields of :class:`NimSettings`); returns the new settings.

        Setting ``ready_after`` restarts the loading phase from now; setting
        ``model`` alone replaces ``models``.
        """
        return self._state.configure(**settings)

    def set_ready(self, ready: bool | None) -> None:
        """Force readiness: True (ready), False (loading) or None (back to the clock)."""
        self._state.set_ready(ready)

    @property
    def ready(self) -> bool:
        """Whether the server is past its loading phase."""
        return self._state.ready

    def inject(
        self,
        kind: str,
        count: int | None = 1,
        path: str | None = CHAT_PATH,
        *,
        model: str | None = None,
        **params: Any,
    ) -> Fault:
        """Queue a fault for the next ``count`` matching requests (None: all of them).

        ``kind`` is a key of :data:`FAULT_KINDS`, ``params`` its parameters.
        Faults are consumed in the order they were queued by requests to
        ``path`` (None: any path) for ``model`` (None: any model).
        """
        fault = Fault(kind=kind, count=count, path=path, model=model, params=params)
        self._state.queue_faults([fault])
        return fault

    def clear_faults(self) -> None:
        """Drop every queued and permanent fault."""
        self._state.clear_faults()

    @property
    def faults(self) -> list[Fault]:
        """A snapshot of the pending faults."""
        return self._state.faults

    def stats(self) -> dict[tuple[str, str], int]:
        """Number of requests received per ``(method, path)`` (admin requests excluded)."""
        return self._state.stats()

    def count(self, path: str = CHAT_PATH, method: str | None = None) -> int:
        """Number of requests received for ``path`` (with any method unless ``method``)."""
        return self._state.count(path, method)

    @property
    def in_flight(self) -> int:
        """Chat completions being processed right now."""
        return self._state.in_flight

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        return self._state.requests

    def reset(self) -> None:
        """Restore the constructor's settings and clear faults, records, counts and metrics.

        The loading clock is not restarted; a :meth:`set_ready` override is dropped.
        """
        self._state.reset()


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connecting is refused)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
