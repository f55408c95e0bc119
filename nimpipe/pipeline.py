"""The pipeline facade: build it, run turns through it, close it.

:class:`Pipeline` serves six entry points, ``run``, ``arun``, ``stream``,
``astream``, ``map`` and ``amap``, with one implementation: a turn is an
async generator (:class:`nimpipe._turn.TurnRunner`, which walks the phases
and calls the model through :mod:`nimpipe._call`).  The async forms iterate
it on the caller's event loop; the sync forms drive it by hand with blocking
I/O (see :mod:`nimpipe._sync`).  A pipeline is safe to share between threads
and between concurrent tasks: per-turn state lives in the runner, shared
state (plugins, clients) is immutable or locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import attrs

from nimpipe import _sync
from nimpipe._call import Mode
from nimpipe._turn import TurnLog, TurnRunner, current_log, is_local
from nimpipe.config import Config
from nimpipe.errors import (
    CancelledError,
    HookError,
    NimpipeError,
    PluginLoadError,
    ProviderError,
)
from nimpipe.plugins import (
    BUILTIN_STAGES,
    CONTRIB_STAGES,
    Plugins,
    unknown_stage_error,
)
from nimpipe.provider import OpenAIProvider
from nimpipe.types import Route, Turn, TurnResult, Verdict

__all__ = ["AsyncTurnStream", "CancelToken", "Pipeline", "TurnStream"]


class CancelToken:
    """Cancels a running turn from any thread.

    Pass it to ``run``/``arun``/``stream``; :meth:`cancel` stops the turn at
    the next chunk or step (and, under ``arun``, cancels the awaiting task at
    once).  The turn then raises :class:`~nimpipe.errors.CancelledError`; the
    call in flight is recorded as ``cancelled``.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on cancellation (at once if already cancelled); returns a remover."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)

                def remove() -> None:
                    with self._lock:
                        if callback in self._callbacks:
                            self._callbacks.remove(callback)

                return remove
        callback()
        return lambda: None


@attrs.define
class Pipeline:
    """Runs turns through the registered stages and the provider.

    Build one with :meth:`create`; share it between threads and tasks; close
    it with :meth:`close` (or use it as a context manager).
    """

    config: Config
    plugins: Plugins
    provider: OpenAIProvider = attrs.field(factory=OpenAIProvider)
    _closed: bool = attrs.field(default=False, init=False)
    _modes: tuple[Mode, Mode] | None = attrs.field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        config: Config | None = None,
        *,
        plugins: Iterable[Any] = (),
        entrypoints: bool = True,
        provider: OpenAIProvider | None = None,
    ) -> Pipeline:
        """Build a pipeline: built-in stages, enabled contrib stages, ``plugins``, entry points.

        :param config: the configuration (default: :meth:`Config.load`).
        :param plugins: extra plugins, each an object or a ``(name, object)`` pair.
        :param entrypoints: load plugins from the ``nimpipe`` entry-point group
            (``config.load_plugins`` chooses which).
        """
        config = Config.load() if config is None else config
        registry = Plugins(trace=config.trace)
        registry.block(config.disable_plugins)
        for name, module in BUILTIN_STAGES.items():
            registry.register_module(name, module, kind="builtin")
        for name in config.stages:
            contrib = CONTRIB_STAGES.get(name)
            if contrib is None:
                raise unknown_stage_error(config, name)
            registry.register_module(name, contrib, kind="contrib")
        for item in plugins:
            if isinstance(item, tuple):
                registry.register(item[1], item[0])
            else:
                registry.register(item)
        if entrypoints and config.load_plugins != ():
            registry.load_entrypoints(config.load_plugins)
        try:
            registry.pm.check_pending()
        except Exception as exc:
            plugin = getattr(exc, "plugin", None)
            raise PluginLoadError(
                str(exc), plugin=getattr(plugin, "__name__", str(plugin))
            ) from exc
        if config.offline:
            _go_offline(config, registry)
        pipeline = cls(config, registry, provider or OpenAIProvider())
        try:
            _sync.drive(registry.collect("configure", _sync.resolve_blocking, pipeline=pipeline))
        except BaseException:
            # Stages already configured may have started work: stop them.
            with contextlib.suppress(Exception):
                pipeline.close()
            raise
        return pipeline

    def close(self) -> None:
        """Call ``unconfigure`` on every plugin and close the clients (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            _sync.drive(self.plugins.collect("unconfigure", _sync.resolve_blocking, pipeline=self))
        finally:
            self.provider.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hooks(self) -> Plugins:
        """The plugin registry (``pipeline.hooks.call(name, ...)`` calls any hook)."""
        return self.plugins

    @property
    def routes(self) -> tuple[Route, ...]:
        return tuple(self.config.routes.values())

    def replace_routes(self, *routes: Route) -> None:
        """Add or replace routes (stages that discover endpoints use this)."""
        self.config = self.config.with_routes(*routes)

    # ------------------------------------------------------------------
    # entry points
    # ------------------------------------------------------------------

    def run(
        self, turn: Turn, *, cancel: CancelToken | None = None, input_checked: bool = False
    ) -> TurnResult:
        """Run a turn to completion, blocking.  Blocks are returned, not raised.

        ``input_checked=True`` skips ``pre_input``: pass it only with the
        ``checked_turn`` of a :class:`ProviderError` from an earlier try of
        the same input (a retry must not check, or redact, the input twice).
        """
        self._refuse_inside_loop("run")
        result = None
        events = self._events(turn, self._mode(False), False, cancel, input_checked)
        for item in _sync.drive_iter(events):
            if isinstance(item, TurnResult):
                result = item
        assert result is not None
        return result

    async def arun(
        self, turn: Turn, *, cancel: CancelToken | None = None, input_checked: bool = False
    ) -> TurnResult:
        """Run a turn to completion on the running event loop (see :meth:`run`)."""
        result = None
        async with _cancel_scope(cancel):
            async for item in self._events(turn, self._mode(True), False, cancel, input_checked):
                if isinstance(item, TurnResult):
                    result = item
        assert result is not None
        return result

    def stream(
        self, turn: Turn, *, cancel: CancelToken | None = None, input_checked: bool = False
    ) -> TurnStream:
        """Stream a turn: iterate the returned object for text; ``.result`` after the end.

        While any ``post_output`` or ``on_response`` stage (or a deferred input
        check) is active, output is held back until it has been checked: with
        the ``buffer`` policy the checked answer arrives as one chunk, with
        ``sentence`` each sentence is released once it passed.
        """
        self._refuse_inside_loop("stream")
        events = self._events(turn, self._mode(False), True, cancel, input_checked)
        return TurnStream(_sync.drive_iter(events))

    def astream(
        self, turn: Turn, *, cancel: CancelToken | None = None, input_checked: bool = False
    ) -> AsyncTurnStream:
        """Stream a turn on the running event loop (``async for``); see :meth:`stream`."""
        events = self._events(turn, self._mode(True), True, cancel, input_checked)
        return AsyncTurnStream(events, cancel)

    async def amap(
        self,
        turns: Iterable[Turn],
        *,
        concurrency: int = 16,
        throttle: Callable[[], float] | None = None,
        progress: bool | Callable[[int, int], None] = False,
        cancel: CancelToken | None = None,
    ) -> list[TurnResult | NimpipeError]:
        """Run many turns concurrently; results come back in the order of ``turns``.

        :param concurrency: at most this many turns in flight.
        :param throttle: called before each turn starts; returns seconds to
            wait first.  Without it, each turn asks the ``fanout_delay`` hook
            once it holds its slot and waits the largest delay a stage gives
            (the ``nim_health`` stage slows a batch while the server queues).
        :param progress: ``True`` draws a progress line on stderr; a callable
            gets ``(done, total)`` after each turn.
        :param cancel: cancels every turn not yet finished.
        :return: one :class:`TurnResult` or :class:`NimpipeError` per turn: a
            failed turn does not sink the batch.
        """
        items = list(turns)
        total = len(items)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        gate = asyncio.Semaphore(concurrency)
        results: list[TurnResult | NimpipeError | None] = [None] * total
        report = _progress_reporter(progress, total)
        done = 0

        async def one(index: int, turn: Turn) -> None:
            nonlocal done
            async with gate:
                try:
                    if throttle is not None:
                        delay = _seconds(throttle())
                    else:
                        delay = await self._fanout_delay(turn)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    results[index] = await self.arun(turn, cancel=cancel)
                except NimpipeError as exc:
                    results[index] = exc
            done += 1
            if report is not None:
                report(done, total)

        await asyncio.gather(*(one(i, t) for i, t in enumerate(items)))
        return [r for r in results if r is not None]

    async def _fanout_delay(self, turn: Turn) -> float:
        """The largest delay the ``fanout_delay`` implementations give ``turn``."""
        delay = 0.0
        found = await self.plugins.collect(
            "fanout_delay", _sync.resolve_async, turn=turn, pipeline=self
        )
        for plugin, value in found:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                cause = TypeError(
                    f"returned {type(value).__name__}; expected seconds (a number) or None"
                )
                raise HookError(plugin=plugin, hook="fanout_delay", cause=cause)
            delay = max(delay, _seconds(value))
        return delay

    def map(
        self,
        turns: Iterable[Turn],
        *,
        concurrency: int = 16,
        throttle: Callable[[], float] | None = None,
        progress: bool | Callable[[int, int], None] = False,
        cancel: CancelToken | None = None,
    ) -> list[TurnResult | NimpipeError]:
        """Blocking form of :meth:`amap` (runs its own event loop)."""
        self._refuse_inside_loop("map")
        return asyncio.run(
            self.amap(
                turns, concurrency=concurrency, throttle=throttle, progress=progress, cancel=cancel
            )
        )

    # ------------------------------------------------------------------

    def _mode(self, is_async: bool) -> Mode:
        modes = self._modes
        if modes is None or modes[0].provider is not self.provider:
            modes = self._modes = (
                Mode(self.provider, False, _sync.resolve_blocking),
                Mode(self.provider, True, _sync.resolve_async),
            )
        return modes[is_async]

    @staticmethod
    def _refuse_inside_loop(name: str) -> None:
        if _sync.in_running_loop():
            raise NimpipeError(
                f"Pipeline.{name}() was called inside a running event loop; "
                f"use 'await pipeline.arun(...)' or 'pipeline.astream(...)' there"
            )

    # ------------------------------------------------------------------
    # the turn
    # ------------------------------------------------------------------

    async def _events(
        self,
        turn: Turn,
        mode: Mode,
        streaming: bool,
        cancel: CancelToken | None,
        input_checked: bool = False,
    ) -> AsyncGenerator[str | TurnResult, None]:
        if self._closed:
            raise NimpipeError("the pipeline is closed")
        if not turn.messages:
            raise NimpipeError(f"turn {turn.id} has no messages")
        log = TurnLog()
        token = current_log.set(log)
        try:
            runner = TurnRunner(self, turn, mode, streaming, cancel, log)
            async for item in runner.run(input_checked):
                yield item
        except ProviderError as exc:
            # Tell a caller that retries the whole turn which input already passed.
            if exc.checked_turn is None:
                exc.checked_turn = log.checked_turn
            raise
        finally:
            with contextlib.suppress(ValueError):
                current_log.reset(token)

    def add_verdict(self, verdict: Verdict) -> None:
        """Attach a check's verdict to the running turn.

        Call it from a hook (or a deferred check) of the turn: the verdict
        goes into the next :class:`CallRecord` the turn emits and into
        :attr:`TurnResult.verdicts`.  Raises :class:`NimpipeError` outside a turn.
        """
        log = current_log.get()
        if log is None:
            raise NimpipeError("add_verdict() was called outside a running turn")
        log.verdicts.append(verdict)


def _seconds(value: float) -> float:
    """A delay in seconds; negative, NaN and infinite values count as none."""
    return float(value) if math.isfinite(value) and value > 0 else 0.0


def _progress_reporter(
    progress: bool | Callable[[int, int], None], total: int
) -> Callable[[int, int], None] | None:
    if callable(progress):
        return progress
    if not progress:
        return None
    import sys

    started = time.monotonic()

    def draw(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        rate = done / max(time.monotonic() - started, 1e-9)
        end = "\n" if done == total else ""
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} turns, {rate:.1f}/s{end}"
        )
        sys.stderr.flush()

    return draw


def _go_offline(config: Config, registry: Plugins) -> None:
    """Enforce offline mode for the process and drop plugins that need the network."""
    import logging

    from nimpipe import offline
    from nimpipe.hosts import host_of

    offline.enforce(host_of(r.base_url) for r in config.routes.values() if is_local(r))
    for info in registry.info():
        plugin = registry.pm.get_plugin(info.name)
        if getattr(plugin, "needs_network", False) or getattr(plugin, "NEEDS_NETWORK", False):
            registry.unregister(info.name)
            registry.skipped[info.name] = "needs the network (offline mode)"
            logging.getLogger("nimpipe").warning(
                "offline mode: plugin %r skipped: it needs the network", info.name
            )


class _cancel_scope:
    """Under ``arun``: a CancelToken cancels the awaiting task at once."""

    def __init__(self, cancel: CancelToken | None) -> None:
        self._cancel = cancel
        self._remove: Callable[[], None] | None = None
        self._fired = False

    async def __aenter__(self) -> None:
        if self._cancel is None:
            return
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def fire() -> None:
            self._fired = True
            if task is not None:
                loop.call_soon_threadsafe(task.cancel)

        self._remove = self._cancel.add_callback(fire)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._remove is not None:
            self._remove()
        if self._fired and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            raise CancelledError() from exc
        return False


class TurnStream:
    """Iterate for released text chunks; :attr:`result` holds the :class:`TurnResult` after."""

    def __init__(self, events: Iterator[str | TurnResult]) -> None:
        self._events = events
        self.result: TurnResult | None = None

    def __iter__(self) -> Iterator[str]:
        for item in self._events:
            if isinstance(item, TurnResult):
                self.result = item
            else:
                yield item

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def text(self) -> str:
        """Consume the stream and return the released text."""
        return "".join(self)


class AsyncTurnStream:
    """``async for`` released text chunks; :attr:`result` holds the :class:`TurnResult` after."""

    def __init__(self, events: AsyncIterator[str | TurnResult], cancel: CancelToken | None) -> None:
        self._events = events
        self._cancel = cancel
        self.result: TurnResult | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        async with _cancel_scope(self._cancel):
            async for item in self._events:
                if isinstance(item, TurnResult):
                    self.result = item
                else:
                    yield item

    async def text(self) -> str:
        """Consume the stream and return the released text."""
        return "".join([chunk async for chunk in self])
