"""What a NIM test server knows: settings, queued faults, recorded traffic, metrics, slots.

One :class:`ServerState` belongs to one :class:`NimServer`; the aiohttp
application reads and updates it from the server's event loop while tests
change it from their own threads, so everything shared goes under ``lock``.
The request slots (``num_request_max``) are the exception: only the event
loop touches them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from nimpipe.testing.nim_server.faults import Fault, take_fault
from nimpipe.testing.nim_server.metrics import ModelMetrics, render_metrics
from nimpipe.testing.nim_server.records import Incoming, RecordedRequest
from nimpipe.testing.nim_server.settings import NimSettings, ServedModel

if TYPE_CHECKING:
    import asyncio

__all__ = ["ServerState"]


class ServerState:
    """The mutable state behind one server; thread-safe unless a method says otherwise."""

    def __init__(self, settings: NimSettings) -> None:
        self.initial = settings
        self.settings = settings
        self.models: dict[str, ServedModel] = settings.resolve_models()
        #: Seconds since the epoch when the server was made (the ``created`` of model cards).
        self.created = int(time.time())
        self.lock = threading.Lock()
        #: The event loop serving, while the server runs (set by the runner).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._faults: list[Fault] = []
        self._records: deque[RecordedRequest] = deque(maxlen=max(1, settings.max_recorded))
        self._counts: dict[tuple[str, str], int] = {}
        self._metrics: dict[str, ModelMetrics] = {}
        self._ready_override: bool | None = None
        self._ready_at = 0.0
        self._listening = False
        self._running_total = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()

    # -- settings and readiness ----------------------------------------------

    def configure(self, **changes: Any) -> NimSettings:
        """Apply ``changes`` (fields of :class:`NimSettings`); returns the new settings."""
        with self.lock:
            new = self.settings.evolve(**changes)
            self._apply(new)
            if "ready_after" in changes:
                self._ready_at = time.monotonic() + new.ready_after
                self._ready_override = None
        self._wake_waiters()
        return new

    def _apply(self, new: NimSettings) -> None:
        self.models = new.resolve_models()
        self.settings = new
        if new.max_recorded != self._records.maxlen:
            self._records = deque(self._records, maxlen=max(1, new.max_recorded))

    def listening(self) -> None:
        """The server listens now: the loading phase (``ready_after``) starts."""
        with self.lock:
            self._ready_at = time.monotonic() + self.settings.ready_after
            self._listening = True

    def set_ready(self, ready: bool | None) -> None:
        """Force readiness: True (ready), False (loading) or None (back to the clock)."""
        with self.lock:
            self._ready_override = ready

    @property
    def ready(self) -> bool:
        """Whether the server is past its loading phase."""
        with self.lock:
            if self._ready_override is not None:
                return self._ready_override
            return self._listening and time.monotonic() >= self._ready_at

    def lookup_model(self, body: Mapping[str, Any]) -> tuple[ServedModel | None, str]:
        """The served model a request body names (the first one when it names none)."""
        models = self.models
        name = body.get("model")
        if name is None:
            first = next(iter(models.values()))
            return first, first.id
        return models.get(name) if isinstance(name, str) else None, str(name)

    # -- faults and traffic ------------------------------------------------------

    def queue_faults(self, faults: Iterable[Fault]) -> None:
        """Queue ``faults`` after those already queued."""
        with self.lock:
            self._faults.extend(faults)

    def clear_faults(self) -> None:
        """Drop every queued and permanent fault."""
        with self.lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        """A snapshot of the pending faults."""
        with self.lock:
            return [dataclasses.replace(f) for f in self._faults]

    def record(self, incoming: Incoming) -> Fault | None:
        """Record a (non-admin) request and take the fault that applies to it, if any."""
        record = incoming.record(time.time())
        key = (incoming.method, incoming.path)
        with self.lock:
            self._records.append(record)
            self._counts[key] = self._counts.get(key, 0) + 1
            if not self._faults:
                return None
            return take_fault(self._faults, incoming.path, incoming.model)

    def stats(self) -> dict[tuple[str, str], int]:
        """Number of requests received per ``(method, path)``."""
        with self.lock:
            return dict(self._counts)

    def count(self, path: str, method: str | None = None) -> int:
        """Number of requests received for ``path`` (with any method unless ``method``)."""
        with self.lock:
            return sum(
                n
                for (m, p), n in self._counts.items()
                if p == path and (method is None or m == method)
            )

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self.lock:
            return list(self._records)

    def reset(self) -> None:
        """Restore the first settings; clear faults, records, counts, metrics, forced readiness."""
        with self.lock:
            self._apply(self.initial)
            self._faults.clear()
            self._records.clear()
            self._counts.clear()
            self._metrics = {}
            self._ready_override = None
        self._wake_waiters()

    # -- metrics -----------------------------------------------------------------

    def model_metrics(self, model_id: str) -> ModelMetrics:
        """The figures of ``model_id``, made on first use."""
        with self.lock:
            mm = self._metrics.get(model_id)
            if mm is None:
                mm = self._metrics[model_id] = ModelMetrics()
            return mm

    def finish(
        self,
        mm: ModelMetrics,
        reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        started: float,
        first_token_at: float | None,
    ) -> None:
        """Count one chat completion that ends now (see :meth:`ModelMetrics.finish`)."""
        ended = time.monotonic()
        with self.lock:
            mm.finish(reason, prompt_tokens, completion_tokens, started, first_token_at, ended)

    def metrics_page(self) -> str:
        """The Prometheus text of ``/v1/metrics``."""
        with self.lock:
            return render_metrics(self.settings, self.models, self._metrics)

    # -- request slots (event loop only) -----------------------------------------

    @property
    def in_flight(self) -> int:
        """Chat completions being processed right now."""
        return self._running_total

    async def acquire_slot(self, mm: ModelMetrics) -> None:
        """Wait for one of ``num_request_max`` slots, counted as waiting meanwhile."""
        import asyncio

        if self._running_total >= self.settings.num_request_max:
            loop = asyncio.get_running_loop()
            mm.waiting += 1
            try:
                while self._running_total >= self.settings.num_request_max:
                    fut: asyncio.Future[None] = loop.create_future()
                    self._slot_waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if not fut.done():
                            fut.cancel()
            finally:
                mm.waiting -= 1
        self._running_total += 1
        mm.running += 1

    def release_slot(self, mm: ModelMetrics) -> None:
        """Give a slot back and wake one waiter."""
        self._running_total -= 1
        mm.running -= 1
        while self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def _wake_waiters(self) -> None:
        """Let every waiter look again (``num_request_max`` may have grown); any thread."""
        loop = self.loop
        if loop is None:
            return

        def wake() -> None:
            while self._slot_waiters:
                fut = self._slot_waiters.popleft()
                if not fut.done():
                    fut.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(wake)
