"""The turn pipeline: ``pre_input`` -> ``select_provider`` -> model call ->
``on_response`` -> ``post_output`` -> ``record_cost``.

One implementation serves four entry points: :meth:`Pipeline.run`,
:meth:`Pipeline.arun`, :meth:`Pipeline.stream` and :meth:`Pipeline.astream`.
The turn logic is an async generator; the async forms iterate it on the
caller's event loop, the sync forms drive it by hand with blocking I/O (see
:mod:`nimpipe._sync`).  A pipeline is safe to share between threads and
between concurrent tasks: per-turn state lives in the generator, shared
state (plugins, clients) is immutable or locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

import attrs

from nimpipe import _sync
from nimpipe.config import Config
from nimpipe.errors import (
    BlockedError,
    CancelledError,
    DeadlineExceededError,
    NimpipeError,
    NoRouteError,
    PluginLoadError,
    ProviderError,
)
from nimpipe.plugins import (
    BUILTIN_STAGES,
    CONTRIB_STAGES,
    Plugins,
    Resolver,
    unknown_stage_error,
)
from nimpipe.provider import OpenAIProvider
from nimpipe.stage import NO_STREAM
from nimpipe.types import (
    Accept,
    Attempt,
    Block,
    CallRecord,
    Deferred,
    Escalate,
    Output,
    Response,
    Retry,
    Rewrite,
    Role,
    Route,
    Turn,
    TurnResult,
    Usage,
    Verdict,
)

__all__ = ["AsyncTurnStream", "CancelToken", "Pipeline", "TurnStream"]


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_STRENGTH = {Block: 4, Escalate: 3, Retry: 2, Accept: 1}


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


# --------------------------------------------------------------------------
# Sync and async strategies: the only place the two modes differ.
# --------------------------------------------------------------------------


@attrs.frozen
class _Mode:
    provider: OpenAIProvider
    is_async: bool
    resolve: Resolver

    async def complete(self, route: Route, turn: Turn, timeout: float) -> Response:
        if self.is_async:
            remaining = turn.remaining()
            call = self.provider.acomplete(route, turn, timeout)
            if remaining is None:
                return await call
            try:
                return await asyncio.wait_for(call, max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise DeadlineExceededError(
                    f"turn {turn.id} ran past its deadline", turn_id=turn.id
                ) from None
        return self.provider.complete(route, turn, timeout)

    def stream(self, route: Route, turn: Turn, timeout: float) -> AsyncIterator[str | Response]:
        if self.is_async:
            return self.provider.astream(route, turn, timeout)
        return _sync.SyncIter(self.provider.stream(route, turn, timeout))

    async def sleep(self, seconds: float) -> None:
        if self.is_async:
            await asyncio.sleep(seconds)
        else:
            time.sleep(seconds)


@attrs.define
class _TurnLog:
    """What one turn accumulates: decisions, call records and check verdicts."""

    decisions: list[Any] = attrs.field(factory=list)
    records: list[CallRecord] = attrs.field(factory=list)
    verdicts: list[Verdict] = attrs.field(factory=list)
    #: How many verdicts are already attached to a record.
    attached: int = 0
    #: The turn as it passed every input check (``None`` until it has).
    checked_turn: Turn | None = None


@attrs.frozen
class _Abort:
    """A call cut short by a block: the block and the outcome to record."""

    block: Block
    outcome: str


#: The log of the turn running in the current context (thread or task).
_current_log: contextvars.ContextVar[_TurnLog | None] = contextvars.ContextVar(
    "nimpipe_turn_log", default=None
)


async def _race_checks(
    items: AsyncIterator[str | Response],
    checks: Sequence[asyncio.Future[Any]],
    deferred: tuple[Deferred, ...],
) -> AsyncGenerator[str | Response | _Abort, None]:
    """Stream ``items``, but stop with an :class:`_Abort` as soon as a deferred check blocks.

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
            block = Pipeline._finished_block(checks, deferred)
            if block is not None:
                yield _Abort(block, "cancelled")
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


def _decide(log: _TurnLog, decision: Any, plugin: str) -> Any:
    """Stamp ``decision`` with its plugin, log it, and return it."""
    decision = _stamp(decision, plugin)
    log.decisions.append(decision)
    return decision


def _stamp(decision: Any, plugin: str) -> Any:
    """Fill in the deciding plugin's name on a decision that lacks it."""
    if hasattr(decision, "plugin") and not decision.plugin:
        return attrs.evolve(decision, plugin=plugin)
    return decision


def _backoff(tries: int, retry_after: float | None) -> float:
    if retry_after is not None and retry_after == retry_after:  # not NaN
        return max(0.0, retry_after)
    import random

    return min(8.0, 0.25 * (2**tries)) * (0.5 + random.random() / 2)


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
    _modes: tuple[_Mode, _Mode] | None = attrs.field(default=None, init=False, repr=False)

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
            wait first.  By default, when the ``nim_health`` stage runs, its
            ``backpressure()`` (from the server's ``num_requests_waiting``)
            throttles the batch.
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
        if throttle is None:
            health = self.plugins.pm.get_plugin("nim_health")
            throttle = getattr(health, "backpressure", None)
        gate = asyncio.Semaphore(concurrency)
        results: list[TurnResult | NimpipeError | None] = [None] * total
        report = _progress_reporter(progress, total)
        done = 0

        async def one(index: int, turn: Turn) -> None:
            nonlocal done
            async with gate:
                if throttle is not None:
                    delay = throttle()
                    if delay > 0:
                        await asyncio.sleep(delay)
                try:
                    results[index] = await self.arun(turn, cancel=cancel)
                except NimpipeError as exc:
                    results[index] = exc
            done += 1
            if report is not None:
                report(done, total)

        await asyncio.gather(*(one(i, t) for i, t in enumerate(items)))
        return [r for r in results if r is not None]

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

    def _mode(self, is_async: bool) -> _Mode:
        modes = self._modes
        if modes is None or modes[0].provider is not self.provider:
            modes = self._modes = (
                _Mode(self.provider, False, _sync.resolve_blocking),
                _Mode(self.provider, True, _sync.resolve_async),
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
        mode: _Mode,
        streaming: bool,
        cancel: CancelToken | None,
        input_checked: bool = False,
    ) -> AsyncGenerator[str | TurnResult, None]:
        if self._closed:
            raise NimpipeError("the pipeline is closed")
        if not turn.messages:
            raise NimpipeError(f"turn {turn.id} has no messages")
        log = _TurnLog()
        token = _current_log.set(log)
        try:
            async for item in self._turn(turn, mode, streaming, cancel, log, input_checked):
                yield item
        except ProviderError as exc:
            # Tell a caller that retries the whole turn which input already passed.
            if exc.checked_turn is None:
                exc.checked_turn = log.checked_turn
            raise
        finally:
            with contextlib.suppress(ValueError):
                _current_log.reset(token)

    def add_verdict(self, verdict: Verdict) -> None:
        """Attach a check's verdict to the running turn.

        Call it from a hook (or a deferred check) of the turn: the verdict
        goes into the next :class:`CallRecord` the turn emits and into
        :attr:`TurnResult.verdicts`.  Raises :class:`NimpipeError` outside a turn.
        """
        log = _current_log.get()
        if log is None:
            raise NimpipeError("add_verdict() was called outside a running turn")
        log.verdicts.append(verdict)

    async def _turn(
        self,
        turn: Turn,
        mode: _Mode,
        streaming: bool,
        cancel: CancelToken | None,
        log: _TurnLog,
        input_checked: bool = False,
    ) -> AsyncGenerator[str | TurnResult, None]:
        plugins = self.plugins
        _check(turn, cancel)

        # Phase 1: input (only when the user spoke last: tool rounds skip it).
        deferred: tuple[Deferred, ...] = ()
        if (
            not input_checked
            and turn.messages[-1].role is Role.USER
            and plugins.has_impls("pre_input")
        ):
            turn, block, deferred = await self._pre_input(turn, mode, log)
            if block is not None:
                if streaming:
                    yield block.message
                yield self._blocked(turn, block, log)
                return
        if deferred and not mode.is_async:
            for check in deferred:
                block = await self._run_deferred(check, mode)
                if block is not None:
                    if streaming:
                        yield block.message
                    yield self._blocked(turn, block, log)
                    return
            deferred = ()
        if not deferred:
            # Every input check has passed: a retry of this turn may skip them.
            log.checked_turn = turn

        judged = plugins.has_impls("on_response")
        checked_output = plugins.has_impls("post_output")
        hold = streaming and (judged or checked_output or bool(deferred))
        sentence_release = (
            streaming
            and checked_output
            and not judged
            and not deferred
            and self.config.stream_policy == "sentence"
        )

        attempt = Attempt()
        last_good: tuple[Route, Response] | None = None
        chosen: tuple[Route, Response] | None = None
        # The accepted call is recorded after post_output, so that output
        # verdicts and an output block reach its record.
        pending_record: tuple[Attempt, str] | None = None
        released: list[str] = []
        while chosen is None:
            route = await self._select(turn, attempt, mode, log)
            if route is None:
                if attempt.cause is not None and last_good is not None:
                    log.decisions.append(
                        Accept(reason="no route left to escalate to", plugin="pipeline")
                    )
                    chosen = last_good
                    break
                raise NoRouteError(_no_route_message(turn, attempt, self.config), turn_id=turn.id)
            if plugins.has_impls("before_call"):
                route, block = await self._before_call(turn, route, attempt, mode, log)
                if block is not None:
                    if streaming:
                        yield block.message
                    yield self._blocked(turn, block, log)
                    return

            response: Response | None = None
            error: ProviderError | None = None
            call = self._call(
                turn,
                route,
                mode,
                log,
                attempt,
                cancel,
                streaming,
                hold=hold,
                deferred=deferred,
                sentence_release=sentence_release,
                released=released,
            )
            blocked_mid_call: Block | None = None
            try:
                async for item in call:
                    if isinstance(item, Response):
                        response = item
                    elif isinstance(item, Block):
                        blocked_mid_call = item
                        break
                    else:
                        yield item
            except ProviderError as exc:
                error = exc
            finally:
                await call.aclose()
            if blocked_mid_call is not None:
                if streaming:
                    yield blocked_mid_call.message
                yield self._blocked(turn, blocked_mid_call, log)
                return
            deferred = ()  # input checks ran with the first call only

            if response is not None and response.usage.source == "none":
                # The endpoint reported no usage (llama.cpp streams, some proxies):
                # count it here so every stage and the ledger see real figures.
                response = attrs.evolve(response, usage=_estimate(turn, response.text, route))
            decision: Any = None
            if judged:
                decision = await self._judge(turn, route, response, error, attempt, mode, log)
            outcome = _outcome_of(decision, error)
            final = response is not None and error is None and outcome == "ok"
            if response is not None and not final:
                await self._record(
                    turn,
                    route,
                    attempt,
                    response=response,
                    outcome=outcome,
                    reason=_reason(decision),
                    stream=streaming,
                    mode=mode,
                    log=log,
                )
                last_good = (route, response)
            if isinstance(decision, Block):
                if streaming:
                    yield decision.message
                yield self._blocked(turn, decision, log)
                return
            if isinstance(decision, (Escalate, Retry)):
                if attempt.number >= self.config.max_attempts:
                    log.decisions.append(
                        Accept(
                            reason=f"max_attempts ({self.config.max_attempts}) reached",
                            plugin="pipeline",
                        )
                    )
                    if last_good is not None and (response is not None or error is not None):
                        chosen = last_good
                        break
                    if error is not None:
                        raise error
                attempt = Attempt(
                    number=attempt.number + 1,
                    cause=decision,
                    tried=(*attempt.tried, route.name),
                    previous_route=route,
                )
                continue
            if error is not None:
                raise error
            assert response is not None
            chosen = (route, response)
            pending_record = (attempt, _reason(decision))

        route, response = chosen
        # Phase 4: output.  Every text the caller gets is checked, the text that
        # comes with tool calls included; a response of tool calls alone has none.
        text = response.text
        if checked_output and (text or not response.tool_calls):
            already = "".join(released)
            output = Output(text=text, response=response, final=True, released=already)
            new_text, block = await self._post_output(turn, output, mode, log)
            if block is not None:
                if pending_record is not None:
                    await self._record(
                        turn,
                        route,
                        pending_record[0],
                        response=response,
                        outcome="blocked",
                        reason=block.reason,
                        stream=streaming,
                        mode=mode,
                        log=log,
                    )
                if streaming:
                    yield block.message
                yield self._blocked(turn, block, log, route=route, response=response)
                return
            text = new_text
        if pending_record is not None:
            await self._record(
                turn,
                route,
                pending_record[0],
                response=response,
                outcome="ok",
                reason=pending_record[1],
                stream=streaming,
                mode=mode,
                log=log,
            )
        if streaming and hold and not sentence_release and text:
            yield text
        yield TurnResult(
            turn=turn,
            text=text,
            response=response,
            route=route,
            decisions=tuple(log.decisions),
            records=tuple(log.records),
            verdicts=tuple(log.verdicts),
        )

    # ------------------------------------------------------------------
    # phases
    # ------------------------------------------------------------------

    async def _pre_input(
        self, turn: Turn, mode: _Mode, log: _TurnLog
    ) -> tuple[Turn, Block | None, tuple[Deferred, ...]]:
        deferred: list[Deferred] = []
        blocked: list[Block] = []

        def step(plugin: str, result: Any, current: Turn) -> tuple[Turn, bool]:
            if isinstance(result, Turn):
                log.decisions.append(Rewrite(value=result, reason="input rewritten", plugin=plugin))
                return result, False
            if isinstance(result, Rewrite):
                if not isinstance(result.value, Turn):
                    raise NimpipeError(f"plugin {plugin!r}: pre_input Rewrite.value must be a Turn")
                log.decisions.append(_stamp(result, plugin))
                return result.value, False
            if isinstance(result, Block):
                blocked.append(_decide(log, result, plugin))
                return current, True
            if isinstance(result, Deferred):
                deferred.append(_stamp(result, plugin))
                return current, False
            raise NimpipeError(
                f"plugin {plugin!r}: pre_input returned {type(result).__name__}; "
                "expected Turn, Rewrite, Block, Deferred or None"
            )

        turn = await self.plugins.chain(
            "pre_input", mode.resolve, "turn", turn, step, pipeline=self
        )
        return turn, (blocked[0] if blocked else None), tuple(deferred)

    async def _run_deferred(self, check: Deferred, mode: _Mode) -> Block | None:
        try:
            result = await mode.resolve(check.check())
        except BlockedError as exc:
            return exc.block
        if result is None:
            return None
        if not isinstance(result, Block):
            raise NimpipeError(
                f"deferred check {check.name!r} of {check.plugin!r} returned {result!r}"
            )
        return _stamp(result, check.plugin)

    async def _select(
        self, turn: Turn, attempt: Attempt, mode: _Mode, log: _TurnLog
    ) -> Route | None:
        candidates = tuple(self.config.routes.values())
        if self.config.offline:
            candidates = tuple(r for r in candidates if _is_local(r))
        if isinstance(attempt.cause, Escalate):
            candidates = tuple(r for r in candidates if r.name not in attempt.tried)
        if not candidates:
            return None
        if self.plugins.has_impls("filter_routes"):

            def step(plugin: str, result: Any, current: tuple[Route, ...]) -> tuple[Any, bool]:
                kept = tuple(result)
                if not all(isinstance(r, Route) for r in kept):
                    raise NimpipeError(f"plugin {plugin!r}: filter_routes must return routes")
                return kept, not kept

            candidates = await self.plugins.chain(
                "filter_routes", mode.resolve, "routes", candidates, step, turn=turn, pipeline=self
            )
            if not candidates:
                return None
        found = await self.plugins.first(
            "select_provider",
            mode.resolve,
            turn=turn,
            routes=candidates,
            attempt=attempt,
            pipeline=self,
        )
        if found is None:
            return None
        plugin, choice = found
        if isinstance(choice, str):
            choice = self.config.route(choice)
        if not isinstance(choice, Route):
            raise NimpipeError(
                f"plugin {plugin!r}: select_provider returned {type(choice).__name__}"
            )
        return choice

    async def _before_call(
        self, turn: Turn, route: Route, attempt: Attempt, mode: _Mode, log: _TurnLog
    ) -> tuple[Route, Block | None]:
        blocked: list[Block] = []

        def step(plugin: str, result: Any, current: Route) -> tuple[Route, bool]:
            if isinstance(result, Route):
                log.decisions.append(
                    Rewrite(
                        value=result.name,
                        reason=f"route {current.name} -> {result.name}",
                        plugin=plugin,
                    )
                )
                return result, False
            if isinstance(result, Block):
                blocked.append(_decide(log, result, plugin))
                return current, True
            raise NimpipeError(
                f"plugin {plugin!r}: before_call returned {type(result).__name__}; "
                "expected Route, Block or None"
            )

        route = await self.plugins.chain(
            "before_call",
            mode.resolve,
            "route",
            route,
            step,
            turn=turn,
            attempt=attempt,
            pipeline=self,
        )
        return route, (blocked[0] if blocked else None)

    async def _judge(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
        mode: _Mode,
        log: _TurnLog,
    ) -> Any:
        results = await self.plugins.collect(
            "on_response",
            mode.resolve,
            turn=turn,
            route=route,
            response=response,
            error=error,
            attempt=attempt,
            pipeline=self,
        )
        best: Any = None
        for plugin, result in results:
            strength = _STRENGTH.get(type(result))
            if strength is None:
                raise NimpipeError(
                    f"plugin {plugin!r}: on_response returned {type(result).__name__}; "
                    "expected Accept, Retry, Escalate, Block or None"
                )
            result = _stamp(result, plugin)
            log.decisions.append(result)
            if best is None or strength > _STRENGTH[type(best)]:
                best = result
        return best

    async def _post_output(
        self, turn: Turn, output: Output, mode: _Mode, log: _TurnLog
    ) -> tuple[str, Block | None]:
        blocked: list[Block] = []

        def step(plugin: str, result: Any, current: Output) -> tuple[Output, bool]:
            if isinstance(result, str):
                log.decisions.append(
                    Rewrite(value=result, reason="output rewritten", plugin=plugin)
                )
                return attrs.evolve(current, text=result), False
            if isinstance(result, Rewrite):
                if not isinstance(result.value, str):
                    raise NimpipeError(
                        f"plugin {plugin!r}: post_output Rewrite.value must be a str"
                    )
                log.decisions.append(_stamp(result, plugin))
                return attrs.evolve(current, text=result.value), False
            if isinstance(result, Block):
                blocked.append(_decide(log, result, plugin))
                return current, True
            raise NimpipeError(
                f"plugin {plugin!r}: post_output returned {type(result).__name__}; "
                "expected str, Rewrite, Block or None"
            )

        final = await self.plugins.chain(
            "post_output", mode.resolve, "output", output, step, turn=turn, pipeline=self
        )
        return final.text, (blocked[0] if blocked else None)

    # ------------------------------------------------------------------
    # the model call
    # ------------------------------------------------------------------

    async def _call(
        self,
        turn: Turn,
        route: Route,
        mode: _Mode,
        log: _TurnLog,
        attempt: Attempt,
        cancel: CancelToken | None,
        streaming: bool,
        *,
        hold: bool,
        deferred: tuple[Deferred, ...],
        sentence_release: bool,
        released: list[str],
    ) -> AsyncGenerator[str | Response | Block, None]:
        """One model call with transport retries; yields released text, then the Response.

        Yields a :class:`Block` instead when a deferred input check or a
        sentence check blocks mid-call.
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
                        async for item in self._stream_once(
                            turn,
                            route,
                            mode,
                            log,
                            timeout,
                            cancel,
                            checks,
                            deferred,
                            hold=hold,
                            sentence_release=sentence_release,
                            released=released,
                            partial=partial,
                        ):
                            if isinstance(item, _Abort):
                                await self._record_aborted(
                                    turn,
                                    route,
                                    attempt,
                                    started,
                                    partial,
                                    item.outcome,
                                    item.block.reason,
                                    mode,
                                    log,
                                )
                                yield item.block
                                return
                            yield item
                            if isinstance(item, Response):
                                return
                    else:
                        if checks:
                            response_or_block = await self._complete_with_checks(
                                turn, route, timeout, mode, checks, deferred
                            )
                            if isinstance(response_or_block, Block):
                                await self._record_aborted(
                                    turn,
                                    route,
                                    attempt,
                                    started,
                                    partial,
                                    "cancelled",
                                    "input blocked",
                                    mode,
                                    log,
                                )
                                yield response_or_block
                                return
                            response = response_or_block
                        else:
                            response = await mode.complete(route, turn, timeout)
                        if streaming and not hold and response.text:
                            # A route that does not stream still streams to the caller.
                            released.append(response.text)
                            yield response.text
                        yield response
                        return
                except ProviderError as exc:
                    # Text the caller already has cannot be taken back: a retry
                    # would send it twice (unheld streams, released sentences).
                    shown = partial and (not hold or len(released) > released_before)
                    retrying = exc.transient and tries < route.max_retries and not shown
                    delay = _backoff(tries, exc.retry_after) if retrying else 0.0
                    remaining = turn.remaining()
                    if retrying and (
                        delay > self.config.max_retry_wait
                        or (remaining is not None and delay >= remaining)
                    ):
                        retrying = False
                    await self._record_failed(
                        turn,
                        route,
                        attempt,
                        started,
                        exc,
                        partial,
                        "retried" if retrying else "error",
                        streaming,
                        mode,
                        log,
                    )
                    if not retrying:
                        raise
                    tries += 1
                    await mode.sleep(delay)
                    _check(turn, cancel)
                except BaseException as exc:
                    if isinstance(
                        exc, (CancelledError, DeadlineExceededError, asyncio.CancelledError)
                    ):
                        await self._record_aborted(
                            turn,
                            route,
                            attempt,
                            started,
                            partial,
                            "cancelled",
                            type(exc).__name__,
                            mode,
                            log,
                        )
                    raise
        finally:
            for task in checks:
                if not task.done():
                    task.cancel()

    async def _stream_once(
        self,
        turn: Turn,
        route: Route,
        mode: _Mode,
        log: _TurnLog,
        timeout: float,
        cancel: CancelToken | None,
        checks: Sequence[asyncio.Future[Any]],
        deferred: tuple[Deferred, ...],
        *,
        hold: bool,
        sentence_release: bool,
        released: list[str],
        partial: list[str],
    ) -> AsyncGenerator[str | Response | _Abort, None]:
        """One streamed request: yields released text, then the Response, or an _Abort."""
        pending = ""  # held text not yet checked (sentence release)

        async def release(segment: str) -> str | _Abort:
            output = Output(text=segment, final=False, released="".join(released))
            text, block = await self._post_output(turn, output, mode, log)
            if block is not None:
                return _Abort(block, "blocked")
            released.append(text)
            return text

        raw = mode.stream(route, turn, timeout)
        items: AsyncIterator[str | Response | _Abort] = (
            _race_checks(raw, checks, deferred) if checks else raw
        )
        async for item in items:
            _check(turn, cancel)
            if isinstance(item, _Abort):
                yield item
                return
            if isinstance(item, Response):
                if sentence_release and pending:
                    yield await release(pending)
                block = await self._await_checks(checks, deferred) if checks else None
                yield _Abort(block, "cancelled") if block is not None else item
                return
            partial.append(item)
            if not hold:
                released.append(item)
                yield item
            elif sentence_release:
                pending += item
                pieces = _SENTENCE_END.split(pending)
                if len(pieces) > 1:
                    cut = len(pending) - len(pieces[-1])
                    segment, pending = pending[:cut], pending[cut:]
                    result = await release(segment)
                    yield result
                    if isinstance(result, _Abort):
                        return

    async def _complete_with_checks(
        self,
        turn: Turn,
        route: Route,
        timeout: float,
        mode: _Mode,
        checks: Sequence[asyncio.Future[Any]],
        deferred: tuple[Deferred, ...],
    ) -> Response | Block:
        call = asyncio.ensure_future(mode.complete(route, turn, timeout))
        pending: set[asyncio.Future[Any]] = {call, *checks}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                block = self._finished_block(checks, deferred)
                if block is not None:
                    return block
                if call in done:
                    block = await self._await_checks(checks, deferred)
                    return block if block is not None else call.result()
        finally:
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call

    @staticmethod
    def _finished_block(
        checks: Sequence[asyncio.Future[Any]], deferred: tuple[Deferred, ...]
    ) -> Block | None:
        for task, d in zip(checks, deferred, strict=True):
            if task.done():
                result = task.result()
                if isinstance(result, Block):
                    return _stamp(result, d.plugin)
        return None

    async def _await_checks(
        self, checks: Sequence[asyncio.Future[Any]], deferred: tuple[Deferred, ...]
    ) -> Block | None:
        for task in checks:
            if not task.done():
                await asyncio.wait([task])
        return self._finished_block(checks, deferred)

    # ------------------------------------------------------------------
    # records
    # ------------------------------------------------------------------

    async def _record(
        self,
        turn: Turn,
        route: Route,
        attempt: Attempt,
        *,
        response: Response,
        outcome: str,
        reason: str,
        stream: bool,
        mode: _Mode,
        log: _TurnLog,
    ) -> None:
        record = _make_record(
            turn,
            route,
            attempt,
            usage=response.usage,
            started=time.time() - response.latency,
            latency=response.latency,
            ttft=response.ttft,
            outcome=outcome,
            reason=reason,
            stream=stream,
            error=None,
        )
        await self._emit(record, turn, mode, log)

    async def _record_failed(
        self,
        turn: Turn,
        route: Route,
        attempt: Attempt,
        started: float,
        exc: ProviderError,
        partial: list[str],
        outcome: str,
        stream: bool,
        mode: _Mode,
        log: _TurnLog,
    ) -> None:
        usage = _estimate(turn, "".join(partial), route) if partial else Usage(source="none")
        record = _make_record(
            turn,
            route,
            attempt,
            usage=usage,
            started=started,
            latency=time.time() - started,
            ttft=None,
            outcome=outcome,
            reason=str(exc),
            stream=stream,
            error=exc.kind,
        )
        await self._emit(record, turn, mode, log)

    async def _record_aborted(
        self,
        turn: Turn,
        route: Route,
        attempt: Attempt,
        started: float,
        partial: list[str],
        outcome: str,
        reason: str,
        mode: _Mode,
        log: _TurnLog,
    ) -> None:
        # A call cut short still spent the prompt's tokens: estimate them.
        usage = _estimate(turn, "".join(partial), route)
        record = _make_record(
            turn,
            route,
            attempt,
            usage=usage,
            started=started,
            latency=time.time() - started,
            ttft=None,
            outcome=outcome,
            reason=reason,
            stream=bool(partial),
            error=None,
        )
        await self._emit(record, turn, mode, log)

    async def _emit(self, record: CallRecord, turn: Turn, mode: _Mode, log: _TurnLog) -> None:
        if len(log.verdicts) > log.attached:
            record = attrs.evolve(record, verdicts=tuple(log.verdicts[log.attached :]))
            log.attached = len(log.verdicts)
        log.records.append(record)
        if self.plugins.has_impls("record_cost"):
            await self.plugins.collect(
                "record_cost", mode.resolve, record=record, turn=turn, pipeline=self
            )

    def _blocked(
        self,
        turn: Turn,
        block: Block,
        log: _TurnLog,
        *,
        route: Route | None = None,
        response: Response | None = None,
    ) -> TurnResult:
        return TurnResult(
            turn=turn,
            text=block.message,
            response=response,
            route=route,
            blocked=block,
            decisions=tuple(log.decisions),
            records=tuple(log.records),
            verdicts=tuple(log.verdicts),
        )


def _make_record(
    turn: Turn,
    route: Route,
    attempt: Attempt,
    *,
    usage: Usage,
    started: float,
    latency: float,
    ttft: float | None,
    outcome: str,
    reason: str,
    stream: bool,
    error: str | None,
) -> CallRecord:
    price = route.price
    cost = price.cost(usage.prompt_tokens, usage.completion_tokens) if price else 0.0
    return CallRecord(
        time=started,
        turn_id=turn.id,
        agent_id=turn.agent_id,
        agent_type=turn.agent_type,
        route=route.name,
        provider=route.host,
        model=turn.model or route.model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        usage_source=usage.source,
        cost_usd=cost,
        price_source=price.source if price else "none",
        latency=latency,
        ttft=ttft,
        outcome=outcome,
        error=error,
        attempt=attempt.number,
        reason=reason,
        stream=stream,
    )


def _estimate(turn: Turn, completion_text: str, route: Route) -> Usage:
    from nimpipe import tokens

    model = turn.model or route.model
    prompt = tokens.count_messages(turn.messages, model, turn.tools).count
    completion = tokens.count_tokens(completion_text, model).count if completion_text else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, source="estimated")


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


def _is_local(route: Route) -> bool:
    from nimpipe.hosts import host_of, is_loopback

    return route.self_hosted or is_loopback(host_of(route.base_url))


def _go_offline(config: Config, registry: Plugins) -> None:
    """Enforce offline mode for the process and drop plugins that need the network."""
    import logging

    from nimpipe import offline
    from nimpipe.hosts import host_of

    offline.enforce(host_of(r.base_url) for r in config.routes.values() if _is_local(r))
    for info in registry.info():
        plugin = registry.pm.get_plugin(info.name)
        if getattr(plugin, "needs_network", False) or getattr(plugin, "NEEDS_NETWORK", False):
            registry.unregister(info.name)
            registry.skipped[info.name] = "needs the network (offline mode)"
            logging.getLogger("nimpipe").warning(
                "offline mode: plugin %r skipped: it needs the network", info.name
            )


def _timeout(turn: Turn, route: Route) -> float:
    remaining = turn.remaining()
    if remaining is None:
        return route.timeout
    if remaining <= 0:
        raise DeadlineExceededError(f"turn {turn.id} ran past its deadline", turn_id=turn.id)
    return min(route.timeout, remaining)


def _check(turn: Turn, cancel: CancelToken | None) -> None:
    if cancel is not None and cancel.cancelled:
        raise CancelledError(turn_id=turn.id)
    remaining = turn.remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceededError(f"turn {turn.id} ran past its deadline", turn_id=turn.id)


def _outcome_of(decision: Any, error: ProviderError | None) -> str:
    if isinstance(decision, Escalate):
        return "escalated"
    if isinstance(decision, Retry):
        return "retried"
    if isinstance(decision, Block):
        return "blocked"
    return "error" if error is not None else "ok"


def _reason(decision: Any) -> str:
    if decision is None:
        return ""
    return f"{decision.plugin}: {decision.reason}" if decision.reason else decision.plugin


def _no_route_message(turn: Turn, attempt: Attempt, config: Config) -> str:
    if not config.routes:
        return (
            "no route is configured: add [routes.NAME] to nimpipe.toml, or set "
            "NIMPIPE_BASE_URL and NIMPIPE_MODEL (or jaato's JAATO_NIM_BASE_URL and JAATO_NIM_MODEL)"
        )
    if config.offline and not any(_is_local(r) for r in config.routes.values()):
        return (
            "offline mode: no route is local or self-hosted (mark one with "
            "self_hosted = true, or turn offline mode off)"
        )
    if turn.route is not None and attempt.number == 1:
        return (
            f"turn {turn.id} asks for route {turn.route!r}, which is not available "
            f"(routes: {', '.join(config.routes)})"
        )
    return f"no route left for turn {turn.id} (tried: {', '.join(attempt.tried) or 'none'})"


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
