"""Contrib stage ``nim_health``: a health registry per endpoint, and routing on NIM's own load.

Enable it with a ``[stages.nim_health]`` table (its settings, all optional,
are :class:`~nimpipe_contrib.nim.health_settings.HealthSettings` and
``docs/catalog-health.md``).  The stage's hooks:

- ``configure`` starts a :class:`~nimpipe_contrib.nim.monitor.HealthMonitor`
  whose scheduler thread probes the watched endpoints (self-hosted ones by
  default; offline, only local ones) and fills the registry; it never waits;
- ``filter_routes`` and ``select_provider`` route on the registry alone, no
  request on a turn's path (:mod:`nimpipe_contrib.nim.routing`); with
  ``wait_for_ready = N`` a turn whose every peer is loading waits up to ``N``
  seconds (within its deadline) for one to be ready;
- ``before_call`` and ``record_cost`` count calls in flight and feed each
  call's outcome (error kind, latency, time to first token) to the registry,
  whose circuit breaker opens after ``failure_threshold`` failures;
- ``fanout_delay`` slows a ``map``/``amap`` batch while an endpoint queues
  (:meth:`NimHealth.backpressure`), and ``route_usable`` tells other stages
  which routes the registry considers callable (:meth:`NimHealth.usable`);
- ``nim_status`` (declared here) gives jaato's ``nim-status`` one row per route;
- ``nim_models_seen`` (declared here and by the catalog) passes on the models
  each probe's ``/v1/models`` listed.

:meth:`NimHealth.wait_until_ready` (and the module-level
:func:`~nimpipe_contrib.nim.monitor.wait_until_ready`, which needs no
pipeline) blocks until an endpoint is ready, printing ``waiting for NIM at
URL: loading model, 40 s`` lines.  :meth:`NimHealth.server_tokens` gives
the server's own token counters to a cost stage.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.stage import hookimpl
from nimpipe.types import Attempt, CallRecord, Route, Turn
from nimpipe_contrib.nim.endpoints import ModelCard, endpoint_url, endpoints_of
from nimpipe_contrib.nim.health_settings import STAGE_NAME, HealthSettings
from nimpipe_contrib.nim.hookspecs import ModelsHookSpecs, StatusHookSpecs, declare_hooks
from nimpipe_contrib.nim.monitor import HealthMonitor, print_progress
from nimpipe_contrib.nim.reports import route_status_rows, status_row
from nimpipe_contrib.nim.routing import CallsInFlight, HealthRouting

if TYPE_CHECKING:
    import pluggy

    from nimpipe import Pipeline
    from nimpipe_contrib.nim.registry import EndpointHealth, HealthRegistry

__all__ = ["STAGE_NAME", "NimHealth", "create_plugin"]


@attrs.define(eq=False)
class NimHealth:
    """The ``nim_health`` stage.  Its :attr:`registry` and :attr:`monitor` exist once configured."""

    settings: HealthSettings = attrs.field(factory=HealthSettings)
    #: Where "waiting for NIM" lines go (default: standard error).
    progress: Callable[[str], None] | None = print_progress
    monitor: HealthMonitor | None = attrs.field(default=None, init=False)
    _pipeline: Pipeline | None = attrs.field(default=None, init=False)
    _in_flight: CallsInFlight = attrs.field(factory=CallsInFlight, init=False)
    _routing: HealthRouting | None = attrs.field(default=None, init=False)

    @property
    def registry(self) -> HealthRegistry:
        """The health registry (raises before ``configure``)."""
        return self._require_monitor().registry

    # ------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        declare_hooks(pluginmanager, StatusHookSpecs, "nim_status")
        declare_hooks(pluginmanager, ModelsHookSpecs, "nim_models_seen")

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        """Read settings and start the background probes (returns at once)."""
        self.settings = HealthSettings.from_table(
            pipeline.config.stage(STAGE_NAME), pipeline.config.source
        )
        self._pipeline = pipeline
        self.monitor = HealthMonitor(
            settings=self.settings,
            endpoints=lambda: endpoints_of(pipeline.routes),
            offline=lambda: pipeline.config.offline,
            periodic=self.settings.interval > 0 and self.settings.probe != "none",
            on_models=self._pass_models_on,
            busy=self._in_flight.busy,
        )
        self._routing = HealthRouting(self.settings, self.monitor, self._in_flight)
        if self.monitor.periodic:
            self.monitor.start()

    @hookimpl
    def unconfigure(self, pipeline: Pipeline) -> None:
        """Stop the background probes."""
        if self.monitor is not None:
            self.monitor.close()

    @hookimpl
    def filter_routes(
        self, turn: Turn, routes: tuple[Route, ...], pipeline: Pipeline
    ) -> tuple[Route, ...] | Awaitable[tuple[Route, ...] | None] | None:
        """Drop unusable routes, order peers by load; reads the registry only."""
        if self._routing is None:
            return None
        return self._routing.filter(
            turn,
            routes,
            pipeline,
            may_wait=self.settings.wait_for_ready > 0,
            progress=self.progress,
        )

    @hookimpl
    def select_provider(
        self, turn: Turn, routes: tuple[Route, ...], attempt: Attempt, pipeline: Pipeline
    ) -> Route | None:
        """The least loaded usable peer of the turn's route (first attempt only)."""
        if self._routing is None or attempt.cause is not None or not routes:
            return None
        return self._routing.choose(turn, routes, pipeline)

    @hookimpl(trylast=True)
    def before_call(self, route: Route) -> None:
        """Count the call as in flight at its endpoint until its ``record_cost``.

        ``trylast``: it sees the route other stages settled on, and no later
        implementation can block the call after it was counted.
        """
        if self.monitor is not None:
            self._in_flight.add(route.base_url, time.monotonic())

    @hookimpl
    def record_cost(self, record: CallRecord, pipeline: Pipeline) -> None:
        """Passive signals: the call's error kind, latency and time to first token."""
        if self.monitor is None:
            return
        url = _endpoint_of(record, pipeline)
        if url is None:
            return
        if not (record.outcome == "retried" and record.error is not None):
            self._in_flight.drop(url)
        if record.outcome == "cancelled":
            return
        before = self.registry.snapshot(url).circuit
        after = self.registry.record_call(
            url,
            error=record.error,
            reason=record.reason,
            latency=record.latency if record.error is None else None,
            ttft=record.ttft,
        )
        if after.circuit is not before:
            self.monitor.wake()  # the half-open probe is due after the cool-down

    @hookimpl
    def fanout_delay(self) -> float:
        """Slow a fan-out while an endpoint queues (:meth:`backpressure`)."""
        return self.backpressure()

    @hookimpl
    def route_usable(self, route: Route) -> bool | None:
        """Whether the registry lets ``route`` take a call now (``None`` before ``configure``)."""
        if self._routing is None:
            return None
        return self.usable(route)

    @hookimpl
    def nim_status(self, pipeline: Pipeline) -> list[dict[str, Any]]:
        """Rows for jaato's ``nim-status``: one per route."""
        if self.monitor is None:
            return []
        return route_status_rows(pipeline.routes, self.registry, self.settings)

    # ------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------

    def probe(self, targets: Iterable[Route | str] | None = None) -> list[EndpointHealth]:
        """Probe now (default: every endpoint of the pipeline's routes); blocking."""
        monitor = self._require_monitor()
        if targets is None:
            return monitor.probe()
        return monitor.probe([monitor.endpoint(t) for t in targets])

    def usable(self, route: Route) -> bool:
        """Whether ``route`` may be called now, by the registry alone."""
        if self._routing is None:
            raise RuntimeError("the nim_health stage is not configured")
        return self._routing.usable(route, self.registry.view(), time.monotonic())

    def server_tokens(self, route: Route | str) -> tuple[float, float] | None:
        """The server's ``(prompt_tokens_total, generation_tokens_total)`` at a route's endpoint."""
        monitor = self._require_monitor()
        health = self.registry.snapshot(monitor.endpoint(route).url)
        prompt, generated = health.prompt_tokens_total, health.generation_tokens_total
        if prompt is None or generated is None:
            return None
        return prompt, generated

    def wait_until_ready(
        self,
        target: Route | str,
        timeout: float,
        *,
        progress: Callable[[str], None] | None = None,
    ) -> EndpointHealth:
        """Block until ``target`` is ready (see :meth:`HealthMonitor.wait_until_ready`)."""
        return self._require_monitor().wait_until_ready(
            target, timeout, progress=progress or self.progress
        )

    def backpressure(self, route: Route | None = None) -> float:
        """Seconds a fan-out should wait before starting another turn on ``route``.

        Zero while the endpoint's queue (``num_requests_waiting``) is below
        ``overload_waiting``; beyond it, a delay that grows with the queue
        (50 ms per waiting request, at most 2 s), so that a batch stops
        piling requests onto a server that is already queueing them.  With no
        route, the deepest queue among the configured self-hosted endpoints
        counts.  Reads the registry only: no request is made.
        """
        if self.monitor is None or self._pipeline is None:
            return 0.0
        routes = (route,) if route is not None else self._pipeline.routes
        deepest = 0.0
        for candidate in routes:
            waiting = self.registry.snapshot(candidate).waiting
            if waiting is not None:
                deepest = max(deepest, waiting)
        if deepest < self.settings.overload_waiting:
            return 0.0
        return min(2.0, 0.05 * deepest)

    def status(self) -> list[dict[str, Any]]:
        """One row per endpoint, as ``nimpipe status --json`` prints them."""
        monitor = self._require_monitor()
        return [
            status_row(self.registry.snapshot(e.url), self.settings, e) for e in monitor.endpoints()
        ]

    # ------------------------------------------------------------------

    def _require_monitor(self) -> HealthMonitor:
        if self.monitor is None:
            raise RuntimeError("the nim_health stage is not configured")
        return self.monitor

    def _pass_models_on(self, url: str, cards: Sequence[ModelCard]) -> None:
        # Whoever keeps a catalog (the nim_catalog stage, when it is on) hears it by hook.
        pipeline = self._pipeline
        if pipeline is None:
            return
        pipeline.hooks.call("nim_models_seen", url=url, cards=tuple(cards), pipeline=pipeline)


def _endpoint_of(record: CallRecord, pipeline: Pipeline) -> str | None:
    """The endpoint a call went to: its route's, else the one whose host is its provider."""
    route = pipeline.config.routes.get(record.route)
    if route is not None:
        return endpoint_url(route.base_url)
    for endpoint in endpoints_of(pipeline.routes):
        host = endpoint.url.split("://", 1)[-1].split("/", 1)[0]
        if host == record.provider:
            return endpoint.url
    return None


def create_plugin() -> NimHealth:
    """The stage object registered as ``nim_health`` (one per pipeline)."""
    return NimHealth()
