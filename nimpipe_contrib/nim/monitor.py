"""A registry plus the probes that fill it: the background scheduler, probes on demand, waits.

:class:`HealthMonitor` watches a set of endpoints: a daemon scheduler thread
probes each watched one on its own schedule (``interval`` when ready,
``loading_interval`` while loading, down or never probed; an open circuit
waits for ``cooldown``), and :meth:`HealthMonitor.probe` and
:meth:`HealthMonitor.wait_until_ready` probe on demand.  It needs no
pipeline: ``nimpipe status`` and :func:`wait_until_ready` build one from a
config or a route.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import attrs

from nimpipe.errors import UnavailableError
from nimpipe.stage import host_of, is_private_address
from nimpipe.types import Route
from nimpipe_contrib.nim.endpoints import Endpoint, ModelCard, endpoint_url, endpoints_of
from nimpipe_contrib.nim.health_settings import STAGE_NAME, HealthSettings
from nimpipe_contrib.nim.prober import ProbePlan, Prober
from nimpipe_contrib.nim.registry import Circuit, EndpointHealth, HealthRegistry, HealthState

if TYPE_CHECKING:
    from nimpipe import Config
    from nimpipe_contrib.nim.probes import ProbeResult

__all__ = [
    "HealthMonitor",
    "not_ready_reason",
    "print_progress",
    "wait_until_ready",
    "waiting_line",
]

log = logging.getLogger("nimpipe.health")


def print_progress(message: str) -> None:
    """Where "waiting for NIM" lines go by default: standard error."""
    print(f"nimpipe: {message}", file=sys.stderr, flush=True)


def waiting_line(url: str, health: EndpointHealth, seconds: float) -> str:
    """``waiting for NIM at URL: loading model, 40 s``, from what the registry knows."""
    if health.state is HealthState.LOADING:
        what = "loading model"
    elif health.state is HealthState.DOWN:
        what = f"not answering ({health.last_error or 'no answer'})"
    elif health.state is HealthState.UNKNOWN:
        what = "not probed yet"
    else:
        what = health.last_error or health.state.value
    return f"waiting for NIM at {url}: {what}, {seconds:.0f} s"


@attrs.define
class _Profile:
    """What probes learned about a server's shape."""

    health_checks: bool | None = None
    metrics_url: str | None = None
    #: ``time.monotonic()`` of the last models/metrics request to a server without health checks.
    rare_at: float | None = None


@attrs.define(eq=False)
class HealthMonitor:
    """A registry plus the probes that fill it, for a set of endpoints.

    ``endpoints`` returns the endpoints to know about (the routes in force);
    ``periodic`` starts background probes of the watched ones at
    :meth:`start`.  Usable on its own: ``nimpipe status`` and
    :func:`wait_until_ready` build one without a pipeline.
    """

    settings: HealthSettings
    endpoints: Callable[[], Sequence[Endpoint]]
    offline: Callable[[], bool] = lambda: False
    periodic: bool = False
    #: Called with (endpoint URL, cards) after every valid ``/v1/models`` answer.
    on_models: Callable[[str, Sequence[ModelCard]], None] | None = None
    #: Whether calls are in flight to an endpoint (then a server without health
    #: endpoints is not asked for its models: llama.cpp would interrupt them).
    busy: Callable[[str], bool] = lambda url: False
    registry: HealthRegistry = attrs.field(init=False)
    _prober: Prober | None = attrs.field(default=None, init=False)
    _scheduler: threading.Thread | None = attrs.field(default=None, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _wake: threading.Event = attrs.field(factory=threading.Event, init=False)
    _profiles: dict[str, _Profile] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.registry = HealthRegistry(self.settings.failure_threshold, self.settings.cooldown)

    @classmethod
    def from_config(cls, config: Config, *, periodic: bool = False) -> HealthMonitor:
        """A monitor of ``config``'s endpoints with its ``[stages.nim_health]`` settings."""
        settings = HealthSettings.from_table(config.stage(STAGE_NAME), config.source)
        endpoints = endpoints_of(config.routes.values())
        return cls(
            settings=settings,
            endpoints=lambda: endpoints,
            offline=lambda: config.offline,
            periodic=periodic,
        )

    # ------------------------------------------------------------------

    def start(self) -> None:
        """Start the prober and, when ``periodic``, the scheduler thread (idempotent).

        Never waits on the network.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the health monitor is closed")
            if self.periodic and self._scheduler is None:
                self._scheduler = threading.Thread(
                    target=self._schedule, name="nimpipe-health", daemon=True
                )
                self._scheduler.start()

    def close(self) -> None:
        """Stop probing (waits for requests in flight, at most the probe timeout)."""
        with self._lock:
            self._closed = True
            scheduler, self._scheduler = self._scheduler, None
            prober, self._prober = self._prober, None
        self._stop.set()
        self._wake.set()
        if scheduler is not None and scheduler is not threading.current_thread():
            scheduler.join(self.settings.timeout + 2.0)
        if prober is not None:
            prober.close()

    def wake(self) -> None:
        """Ask the background scheduler to look at the endpoints now."""
        self._wake.set()

    def _ensure_prober(self) -> Prober | None:
        """The prober, made on first use (``httpx`` is imported then); ``None`` once closed."""
        with self._lock:
            if self._prober is None and not self._closed:
                self._prober = Prober(self.settings.timeout)
            return self._prober

    def _schedule(self) -> None:
        running: dict[str, concurrent.futures.Future[EndpointHealth]] = {}
        try:
            self._ensure_prober()
        except Exception:
            log.exception("cannot start the health prober")
            return
        while not self._stop.is_set():
            try:
                delay = self._launch_due(running, self._wake.set)
            except Exception:  # the thread must go on whatever happened
                log.exception("health probing failed")
                delay = self.settings.loading_interval
            self._wake.wait(delay)
            self._wake.clear()

    def watched(self) -> list[Endpoint]:
        """Endpoints the background probes: by the ``probe`` setting, offline only local ones."""
        policy = self.settings.probe
        if policy == "none":
            return []
        offline = self.offline()
        return [
            e
            for e in self.endpoints()
            if e.may_probe(offline=offline) and (policy == "all" or e.self_hosted or e.local)
        ]

    def endpoint(self, target: Route | str) -> Endpoint:
        """The endpoint of a route, a route name or a base URL."""
        url = endpoint_url(target.base_url if isinstance(target, Route) else target)
        known = self.endpoints()
        for endpoint in known:
            if endpoint.url == url or target in endpoint.routes:
                return endpoint
        if isinstance(target, Route):
            return endpoints_of([target])[0]
        if url.startswith(("http://", "https://")):
            return Endpoint(url=url, local=bool(is_private_address(host_of(url))))
        raise ValueError(f"no endpoint or route called {target!r}")

    # ------------------------------------------------------------------

    def probe(
        self, endpoints: Iterable[Endpoint] | None = None, *, timeout: float | None = None
    ) -> list[EndpointHealth]:
        """Probe ``endpoints`` (default: every allowed one) now, concurrently; blocking.

        Returns the new snapshots in order.  Offline, endpoints that are not
        local are left out.
        """
        offline = self.offline()
        chosen = [
            e
            for e in (self.endpoints() if endpoints is None else endpoints)
            if e.may_probe(offline=offline)
        ]
        if not chosen:
            return []
        self.start()
        limit = timeout if timeout is not None else self.settings.timeout * 2 + 5.0
        futures = [self._probe_one(e) for e in chosen]
        return [future.result(limit) for future in futures]

    def _probe_one(self, endpoint: Endpoint) -> concurrent.futures.Future[EndpointHealth]:
        prober = self._ensure_prober()
        out: concurrent.futures.Future[EndpointHealth] = concurrent.futures.Future()
        if prober is None:
            out.set_exception(RuntimeError("the health monitor is closed"))
            return out
        plan = self.plan(endpoint)

        def taken(future: concurrent.futures.Future[ProbeResult]) -> None:
            try:
                out.set_result(self._take(future.result(), plan))
            except BaseException as exc:
                out.set_exception(exc)

        prober.submit(endpoint, plan).add_done_callback(taken)
        return out

    def plan(self, endpoint: Endpoint) -> ProbePlan:
        """What the next probe of ``endpoint`` asks.

        Everything, unless the server has no health endpoints (llama.cpp):
        then ``/v1/models`` and the metrics only on first contact and every
        ``rare_every`` seconds, and never while a call is in flight there,
        because llama.cpp serves ``/v1/models`` under its model lock and, by
        default, interrupts a streaming generation when another request waits.
        """
        profile = self._profiles.get(endpoint.url)
        if profile is None or profile.health_checks is not False:
            metrics_url = profile.metrics_url if profile is not None else None
            return ProbePlan(metrics_url=metrics_url)
        known = bool(self.registry.snapshot(endpoint.url).models)
        due = profile.rare_at is None or time.monotonic() - profile.rare_at >= (
            self.settings.rare_every
        )
        ask = (not known or due) and not self.busy(endpoint.url)
        return ProbePlan(models=ask, metrics=ask, metrics_url=profile.metrics_url)

    def _take(self, result: ProbeResult, plan: ProbePlan) -> EndpointHealth:
        with self._lock:
            profile = self._profiles.setdefault(result.endpoint, _Profile())
            if result.health_checks is not None:
                profile.health_checks = result.health_checks
            if plan.metrics and result.reachable:
                profile.metrics_url = result.metrics_url
            if (plan.models or plan.metrics) and result.reachable:
                profile.rare_at = time.monotonic()
        health = self.registry.apply(result)
        if result.cards is not None and self.on_models is not None:
            try:
                self.on_models(result.endpoint, result.cards)
            except Exception:
                log.exception("passing the models of %s on failed", result.endpoint)
        return health

    def next_probe_at(self, health: EndpointHealth) -> float:
        """When the background should probe an endpoint next (``time.monotonic()``)."""
        if health.checked_mono is None:
            return 0.0
        if health.circuit is Circuit.OPEN and health.opened_at is not None:
            return max(health.opened_at + self.settings.cooldown, health.checked_mono)
        if health.state in (HealthState.LOADING, HealthState.UNKNOWN, HealthState.DOWN):
            period = min(self.settings.loading_interval, self.settings.interval or math.inf)
        else:
            period = self.settings.interval
        return health.checked_mono + period

    def _launch_due(
        self,
        running: dict[str, concurrent.futures.Future[EndpointHealth]],
        on_done: Callable[[], None],
    ) -> float:
        """Start probes of the watched endpoints that are due, each on its own.

        A slow endpoint never delays the others: each probe runs apart, and
        its end wakes the scheduler.  Returns the seconds until the next
        endpoint is due.
        """
        if self.settings.interval <= 0:
            return 3600.0
        for url in [u for u, task in running.items() if task.done()]:
            del running[url]
        now = time.monotonic()
        next_at = now + 3600.0
        for endpoint in self.watched():
            if endpoint.url in running:
                continue
            at = self.next_probe_at(self.registry.snapshot(endpoint.url))
            if at <= now:
                future = self._probe_one(endpoint)
                future.add_done_callback(lambda _: on_done())
                running[endpoint.url] = future
            else:
                next_at = min(next_at, at)
        return max(0.0, next_at - now)

    # ------------------------------------------------------------------

    def wait_until_ready(
        self,
        target: Route | str,
        timeout: float,
        *,
        progress: Callable[[str], None] | None = print_progress,
        interval: float | None = None,
    ) -> EndpointHealth:
        """Probe ``target`` until it is ready; print progress; blocking.

        Returns the ready (or degraded but serving) snapshot.  Raises
        :class:`~nimpipe.errors.UnavailableError` (with the route, when
        ``target`` is one) once ``timeout`` seconds have passed.
        """
        endpoint = self.endpoint(target)
        route = target if isinstance(target, Route) else None
        step = self.settings.loading_interval if interval is None else interval
        started = time.monotonic()
        deadline = started + timeout
        reported: float | None = None
        while True:
            remaining = deadline - time.monotonic()
            (health,) = self.probe([endpoint], timeout=max(remaining, 0.0) + self.settings.timeout)
            if _serving(health):
                if reported is not None and progress is not None:
                    waited = time.monotonic() - started
                    progress(f"NIM at {endpoint.url} is ready after {waited:.0f} s")
                return health
            now = time.monotonic()
            if progress is not None and (
                reported is None or now - reported >= self.settings.progress_every
            ):
                progress(waiting_line(endpoint.url, health, now - started))
                reported = now
            if now >= deadline:
                raise UnavailableError(
                    f"NIM at {endpoint.url} is not ready after {timeout:g} s: "
                    f"{not_ready_reason(health)}",
                    route=route,
                )
            time.sleep(max(0.0, min(step, deadline - now)))


def _serving(health: EndpointHealth) -> bool:
    return health.state is HealthState.READY or (
        health.state is HealthState.DEGRADED and health.ready is not False
    )


def not_ready_reason(health: EndpointHealth) -> str:
    """Why an endpoint is not ready, in words (the end of a timeout's message)."""
    if health.state is HealthState.LOADING:
        return f"still loading its model ({health.last_error or 'ready check answered 503'})"
    return f"{health.state.value}: {health.last_error or 'no detail'}"


def wait_until_ready(
    target: Route | str,
    timeout: float,
    *,
    progress: Callable[[str], None] | None = print_progress,
    interval: float = 1.0,
    probe_timeout: float = 2.0,
    progress_every: float = 10.0,
) -> EndpointHealth:
    """Wait for the NIM behind ``target`` (a route or a base URL) to be ready; blocking.

    Prints ``waiting for NIM at URL: loading model, 40 s`` through
    ``progress`` (default: standard error) every ``progress_every`` seconds
    while it is not ready.  Returns the endpoint's health once it is;
    raises :class:`~nimpipe.errors.UnavailableError` (naming the route) after
    ``timeout`` seconds.  Needs no pipeline: call it before the first turn.
    """
    settings = HealthSettings(
        timeout=probe_timeout, loading_interval=interval, progress_every=progress_every
    )
    endpoints = endpoints_of([target]) if isinstance(target, Route) else []
    monitor = HealthMonitor(settings=settings, endpoints=lambda: endpoints)
    try:
        return monitor.wait_until_ready(target, timeout, progress=progress)
    finally:
        monitor.close()
