"""Routing on health and load: which routes a turn may take, and which peer goes first.

Reads the registry only, so no request happens on a turn's path.  Routes
whose endpoint is down, loading or has an open circuit are dropped; among
*peers* (routes that serve the same model at the same tier) the least
loaded goes first::

    load = num_requests_waiting + gpu_cache_usage_perc
           + (num_requests_running + calls in flight from this pipeline) / num_request_max

and equal peers take turns.  A named route (``turn.route``) is one of its
peers.  When no peer of the turn's route is usable the peers are kept, so
the call fails with the server's own error rather than silently going to
another model.  With ``wait_for_ready`` a turn whose every peer is loading
(or not yet probed) waits for the background probes to see one ready.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from nimpipe.errors import UnavailableError
from nimpipe.types import Route, Turn
from nimpipe_contrib.nim.endpoints import endpoint_url
from nimpipe_contrib.nim.monitor import HealthMonitor, not_ready_reason, waiting_line
from nimpipe_contrib.nim.registry import Circuit, EndpointHealth, HealthState

if TYPE_CHECKING:
    from nimpipe import Pipeline
    from nimpipe_contrib.nim.health_settings import HealthSettings

__all__ = ["CallsInFlight", "HealthRouting", "peers"]

#: How states rank among peers (lower first); other states come last.
_RANKS = {HealthState.READY: 0, HealthState.UNKNOWN: 1, HealthState.DEGRADED: 2}

#: Seconds after which a call never recorded no longer counts as in flight.
_IN_FLIGHT_HORIZON = 600.0


def peers(route: Route, other: Route) -> bool:
    """Whether two routes are peers: the same model at the same tier."""
    return route.model == other.model and route.tier == other.tier


@attrs.define(eq=False)
class CallsInFlight:
    """This pipeline's calls in flight per endpoint, from ``before_call`` to ``record_cost``."""

    _pending: dict[str, deque[float]] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def add(self, base_url: str, now: float) -> None:
        """Count one more call at ``base_url``'s endpoint, started at ``now``."""
        url = endpoint_url(base_url)
        with self._lock:
            self._pending.setdefault(url, deque()).append(now)

    def drop(self, url: str) -> None:
        """One call at endpoint ``url`` ended."""
        with self._lock:
            queue = self._pending.get(url)
            if queue:
                queue.popleft()

    def count(self, url: str, now: float) -> int:
        """Calls in flight at endpoint ``url`` (those older than ten minutes are forgotten)."""
        queue = self._pending.get(url)
        if not queue:
            return 0
        horizon = now - _IN_FLIGHT_HORIZON
        with self._lock:
            while queue and queue[0] < horizon:
                queue.popleft()
            return len(queue)

    def busy(self, url: str) -> bool:
        """Whether any call is in flight at endpoint ``url`` now."""
        return self.count(url, time.monotonic()) > 0


@attrs.define(eq=False)
class HealthRouting:
    """The routing decisions of the ``nim_health`` stage, from its monitor's registry."""

    settings: HealthSettings
    monitor: HealthMonitor
    in_flight: CallsInFlight
    _turns: Iterator[int] = attrs.field(factory=itertools.count, init=False)
    _reported: dict[str, float] = attrs.field(factory=dict, init=False)
    _last_scores: threading.local = attrs.field(factory=threading.local, init=False)

    def usable(self, route: Route, view: Mapping[str, EndpointHealth], now: float) -> bool:
        """Whether ``route`` may be called now, by the registry ``view`` alone."""
        health = view.get(endpoint_url(route.base_url))
        if health is None:
            return True
        circuit = health.circuit_at(now, self.settings.cooldown)
        if circuit is Circuit.OPEN:
            return False
        if circuit is Circuit.HALF_OPEN:
            # A probed endpoint waits for its half-open probe; others admit a trial call.
            return health.checked_mono is None
        if health.state in (HealthState.DOWN, HealthState.LOADING):
            return False
        return not (
            self.settings.require_listed_model
            and health.state is HealthState.READY
            and health.models
            and route.model not in health.models
        )

    def choose(self, turn: Turn, routes: tuple[Route, ...], pipeline: Pipeline) -> Route | None:
        """The least loaded peer of the route ``turn`` would take; ``None`` to leave it be."""
        intended = self._intended(turn, routes, pipeline)
        if intended is None:
            return None
        candidates = [r for r in routes if peers(r, intended)]
        if not candidates:
            return None
        now = time.monotonic()
        if len(candidates) == 1:
            # Nothing to choose: default_route picks the intended route if it is there.
            return None if candidates[0].name == intended.name else candidates[0]
        view = self.monitor.registry.view()
        known: tuple[str, dict[str, tuple[int, float]]] | None = getattr(
            self._last_scores, "scores", None
        )
        scores = known[1] if known is not None and known[0] == turn.id else {}
        scored = [(scores.get(r.name) or self._score(r, view, now), r) for r in candidates]
        best = min(score for score, _ in scored)
        tied = [r for score, r in scored if score == best]
        return tied[next(self._turns) % len(tied)] if len(tied) > 1 else tied[0]

    def filter(
        self,
        turn: Turn,
        routes: tuple[Route, ...],
        pipeline: Pipeline,
        *,
        may_wait: bool,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[Route, ...] | Awaitable[tuple[Route, ...] | None] | None:
        """Drop unusable routes and order peers by load (``None``: unchanged).

        With ``may_wait``, when no peer is usable yet but one is coming
        (loading, or its first probe is on the way), returns an awaitable
        that waits for it, printing through ``progress``.
        """
        now = time.monotonic()
        view = self.monitor.registry.view()
        usable = {r.name: self.usable(r, view, now) for r in routes}
        intended = self._intended(turn, routes, pipeline)
        keep = dict(usable)
        if intended is not None:
            candidates = [r for r in routes if peers(r, intended)]
            if may_wait and candidates and self._worth_waiting(candidates, view, now):
                return self._wait_then_filter(
                    turn, routes, pipeline, intended, candidates, progress
                )
            if candidates and not any(usable[p.name] for p in candidates):
                for peer in candidates:
                    keep[peer.name] = True
        kept = [r for r in routes if keep[r.name]]
        ordered = self._order(turn, kept, view, now)
        return None if tuple(ordered) == routes else tuple(ordered)

    # ------------------------------------------------------------------

    def _score(
        self, route: Route, view: Mapping[str, EndpointHealth], now: float
    ) -> tuple[int, float]:
        url = endpoint_url(route.base_url)
        health = view.get(url)
        pending = self.in_flight.count(url, now)
        if health is None:
            return _RANKS[HealthState.UNKNOWN], float(pending)
        rank = _RANKS.get(health.state, 3)
        metrics = health.metrics
        if metrics is None:
            return rank, float(pending)
        capacity = metrics.max_running if metrics.max_running else 1.0
        load = (
            (metrics.waiting or 0.0)
            + (metrics.kv_cache or 0.0)
            + ((metrics.running or 0.0) + pending) / capacity
        )
        return rank, load

    def _intended(self, turn: Turn, routes: tuple[Route, ...], pipeline: Pipeline) -> Route | None:
        configured = pipeline.config.routes
        if turn.route is not None:
            return configured.get(turn.route) or next(
                (r for r in routes if r.name == turn.route), None
            )
        if turn.model is not None:
            return next((r for r in routes if r.model == turn.model), None) or next(
                (r for r in configured.values() if r.model == turn.model), None
            )
        default = pipeline.config.default_route
        if default is not None and default in configured:
            return configured[default]
        return routes[0] if routes else None

    def _order(
        self, turn: Turn, routes: list[Route], view: Mapping[str, EndpointHealth], now: float
    ) -> list[Route]:
        groups: dict[tuple[str, int], list[int]] = {}
        for index, route in enumerate(routes):
            groups.setdefault((route.model, route.tier), []).append(index)
        ordered = list(routes)
        scores: dict[str, tuple[int, float]] = {}
        for indexes in groups.values():
            if len(indexes) < 2:
                continue
            for i in indexes:
                scores[routes[i].name] = self._score(routes[i], view, now)
            members = sorted((routes[i] for i in indexes), key=lambda r: scores[r.name])
            for slot, route in zip(indexes, members, strict=True):
                ordered[slot] = route
        # choose() runs next on this thread for the same turn: it reuses these.
        self._last_scores.scores = (turn.id, scores)
        return ordered

    def _worth_waiting(
        self, candidates: Sequence[Route], view: Mapping[str, EndpointHealth], now: float
    ) -> bool:
        """Whether no peer is usable yet but a watched one is loading or not yet probed."""
        watched = {e.url for e in self.monitor.watched()}
        coming = False
        for peer in candidates:
            url = endpoint_url(peer.base_url)
            health = view.get(url)
            if health is None or health.probes == 0:
                if url in watched:
                    coming = True  # its first probe is on the way
                    continue
            elif url in watched and health.state is HealthState.LOADING:
                coming = True
                continue
            if self.usable(peer, view, now):
                return False
        return coming

    async def _wait_then_filter(
        self,
        turn: Turn,
        routes: tuple[Route, ...],
        pipeline: Pipeline,
        intended: Route,
        candidates: Sequence[Route],
        progress: Callable[[str], None] | None,
    ) -> tuple[Route, ...] | None:
        budget = self.settings.wait_for_ready
        remaining = turn.remaining()
        if remaining is not None:
            budget = min(budget, max(remaining, 0.0))
        started = time.monotonic()
        deadline = started + budget
        self.monitor.wake()
        while True:
            view = self.monitor.registry.view()
            now = time.monotonic()
            if not self._worth_waiting(candidates, view, now):
                result = self.filter(turn, routes, pipeline, may_wait=False)
                assert not isinstance(result, Awaitable)
                return result
            health = view.get(endpoint_url(intended.base_url)) or EndpointHealth(
                endpoint=endpoint_url(intended.base_url)
            )
            if now >= deadline:
                raise UnavailableError(
                    f"NIM at {health.endpoint} is not ready after waiting {budget:g} s "
                    f"(wait_for_ready): {not_ready_reason(health)}",
                    route=intended,
                )
            self._report_waiting(health, now, progress)
            await asyncio.sleep(min(0.05, max(deadline - now, 0.0)))

    def _report_waiting(
        self, health: EndpointHealth, now: float, progress: Callable[[str], None] | None
    ) -> None:
        if progress is None:
            return
        last = self._reported.get(health.endpoint)
        if last is not None and now - last < self.settings.progress_every:
            return
        self._reported[health.endpoint] = now
        since = health.loading_since if health.loading_since is not None else now
        progress(waiting_line(health.endpoint, health, now - since))
