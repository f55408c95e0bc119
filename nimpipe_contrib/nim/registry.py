"""The health registry: what is known about each endpoint, and its circuit breaker.

Each endpoint is ``unknown``, ``loading`` (live, not ready), ``ready``,
``degraded`` (it answers, but something is wrong: a malformed reply, a
failed readiness check, a missing answer) or ``down`` (no answer, or its
circuit is open).  The circuit opens after ``failure_threshold``
consecutive failures (failed probes, or model calls failing as unavailable,
timed out or malformed); after ``cooldown`` seconds a half-open probe (or,
for an endpoint nobody probes, one trial call) decides.  Probe results come
in through :meth:`HealthRegistry.apply`, model calls through
:meth:`HealthRegistry.record_call`; readers take frozen snapshots without a
lock.
"""

from __future__ import annotations

import enum
import threading
import time
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.types import Route
from nimpipe_contrib.nim.endpoints import endpoint_url

if TYPE_CHECKING:
    from nimpipe_contrib.nim.health_settings import HealthSettings
    from nimpipe_contrib.nim.metrics import ServerMetrics
    from nimpipe_contrib.nim.probes import ProbeResult

__all__ = [
    "HEALTH_ERRORS",
    "Circuit",
    "EndpointHealth",
    "HealthRegistry",
    "HealthState",
]

#: Error kinds of a model call that count against an endpoint's health.
HEALTH_ERRORS = frozenset({"unavailable", "timeout", "malformed_reply"})


class HealthState(str, enum.Enum):
    """What the registry knows about an endpoint."""

    UNKNOWN = "unknown"
    LOADING = "loading"
    READY = "ready"
    DEGRADED = "degraded"
    DOWN = "down"


class Circuit(str, enum.Enum):
    """An endpoint's circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    #: Open, cool-down over: the next probe (or trial call) decides.
    HALF_OPEN = "half_open"


@attrs.frozen(kw_only=True)
class EndpointHealth:
    """The registry's view of one endpoint: a frozen snapshot."""

    endpoint: str
    state: HealthState = HealthState.UNKNOWN
    live: bool | None = None
    ready: bool | None = None
    #: Model ids ``/v1/models`` listed (the last valid answer).
    models: tuple[str, ...] = ()
    #: ``max_model_len`` per model id, where the server gave it.
    max_model_len: Mapping[str, int] = attrs.field(factory=dict, hash=False)
    metrics: ServerMetrics | None = None
    #: ``ok``, ``unavailable`` (the server has none), ``malformed``, ``error`` or ``unknown``.
    metrics_status: str = "unknown"
    #: Seconds the last probe took.
    probe_latency: float | None = None
    #: ``time.time()`` and ``time.monotonic()`` of the last probe.
    checked_at: float | None = None
    checked_mono: float | None = None
    probes: int = 0
    #: Why the endpoint is down, loading or degraded, in words.
    last_error: str | None = None
    #: Everything found wrong by the last probe.
    problems: tuple[str, ...] = ()
    #: ``time.monotonic()`` when it was first seen loading (this time).
    loading_since: float | None = None
    circuit: Circuit = Circuit.CLOSED
    #: ``time.monotonic()`` when the circuit last opened.
    opened_at: float | None = None
    #: Consecutive failed probes and consecutive failed calls.
    probe_failures: int = 0
    call_failures: int = 0
    #: Model calls seen, and how many failed for health reasons.
    calls: int = 0
    call_errors: int = 0
    #: Moving averages of the calls' latency and time to first token, seconds.
    latency_ewma: float | None = None
    ttft_ewma: float | None = None
    last_call_error: str | None = None
    #: Generated tokens per second, server-wide, between the last two probes.
    tokens_per_s: float | None = None

    @property
    def waiting(self) -> float | None:
        """``num_requests_waiting`` of the last probe."""
        return self.metrics.waiting if self.metrics else None

    @property
    def running(self) -> float | None:
        """``num_requests_running`` of the last probe."""
        return self.metrics.running if self.metrics else None

    @property
    def kv_cache(self) -> float | None:
        """``gpu_cache_usage_perc`` of the last probe (0..1)."""
        return self.metrics.kv_cache if self.metrics else None

    @property
    def prompt_tokens_total(self) -> float | None:
        """The server's own ``prompt_tokens_total`` counter (for a cost stage)."""
        return self.metrics.prompt_tokens_total if self.metrics else None

    @property
    def generation_tokens_total(self) -> float | None:
        """The server's own ``generation_tokens_total`` counter (for a cost stage)."""
        return self.metrics.generation_tokens_total if self.metrics else None

    def circuit_at(self, now: float, cooldown: float) -> Circuit:
        """The circuit as of ``now``: an open one turns half-open after ``cooldown``."""
        if (
            self.circuit is Circuit.OPEN
            and self.opened_at is not None
            and now - self.opened_at >= cooldown
        ):
            return Circuit.HALF_OPEN
        return self.circuit

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the last probe, or ``None``."""
        if self.checked_mono is None:
            return None
        return (time.monotonic() if now is None else now) - self.checked_mono

    def overloaded(self, settings: HealthSettings) -> bool:
        """Whether the queue or the KV cache is past the settings' thresholds."""
        waiting, kv = self.waiting, self.kv_cache
        return (waiting is not None and waiting >= settings.overload_waiting) or (
            kv is not None and kv >= settings.overload_kv_cache
        )


def _ewma(previous: float | None, value: float | None, alpha: float = 0.3) -> float | None:
    if value is None:
        return previous
    return value if previous is None else previous + alpha * (value - previous)


@attrs.define(eq=False)
class HealthRegistry:
    """Health of every endpoint, thread-safe.

    Readers get frozen :class:`EndpointHealth` snapshots from an immutable
    view that writers replace under a lock, so reading costs no lock.
    """

    failure_threshold: int = 3
    cooldown: float = 10.0
    _view: Mapping[str, EndpointHealth] = attrs.field(
        factory=lambda: types.MappingProxyType({}), init=False
    )
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def view(self) -> Mapping[str, EndpointHealth]:
        """Every endpoint's snapshot, by endpoint URL (read-only; no lock)."""
        return self._view

    def snapshot(self, endpoint: str | Route) -> EndpointHealth:
        """The snapshot of ``endpoint`` (a base URL or a route); ``unknown`` if never seen."""
        url = endpoint_url(endpoint.base_url if isinstance(endpoint, Route) else endpoint)
        return self._view.get(url) or EndpointHealth(endpoint=url)

    def _publish(self, health: EndpointHealth) -> EndpointHealth:
        view = dict(self._view)
        view[health.endpoint] = health
        self._view = types.MappingProxyType(view)
        return health

    def apply(self, result: ProbeResult) -> EndpointHealth:
        """Take a probe's result; returns the new snapshot."""
        with self._lock:
            prev = self._view.get(result.endpoint) or EndpointHealth(endpoint=result.endpoint)
            now = result.at
            circuit, opened_at = prev.circuit, prev.opened_at
            probe_failures, call_failures = prev.probe_failures, prev.call_failures
            effective = prev.circuit_at(now, self.cooldown)
            if not result.reachable:
                probe_failures += 1
                if effective is Circuit.HALF_OPEN or (
                    effective is Circuit.CLOSED and probe_failures >= self.failure_threshold
                ):
                    circuit, opened_at = Circuit.OPEN, now
            else:
                probe_failures = 0
                if effective is Circuit.HALF_OPEN:
                    circuit, opened_at, call_failures = Circuit.CLOSED, None, 0
            state, last_error = result.state, result.error
            if state is HealthState.DEGRADED and not last_error and result.problems:
                last_error = result.problems[0]
            if circuit is Circuit.OPEN:
                state = HealthState.DOWN
                cause = result.error or prev.last_call_error or prev.last_error or "failures"
                last_error = f"circuit open: {cause}"
            cards = result.cards
            models = tuple(c.id for c in cards) if cards is not None else prev.models
            max_len = (
                {c.id: c.max_model_len for c in cards if c.max_model_len}
                if cards is not None
                else prev.max_model_len
            )
            metrics = result.metrics
            if metrics is None and result.metrics_status == "error":
                metrics = prev.metrics
            rate = prev.tokens_per_s
            if (
                result.metrics is not None
                and prev.metrics is not None
                and prev.checked_mono is not None
                and now > prev.checked_mono
            ):
                before = prev.metrics.generation_tokens_total
                after = result.metrics.generation_tokens_total
                if before is not None and after is not None and after >= before:
                    rate = (after - before) / (now - prev.checked_mono)
                else:
                    rate = None
            loading_since = None
            if state is HealthState.LOADING:
                loading_since = prev.loading_since if prev.loading_since is not None else now
            return self._publish(
                attrs.evolve(
                    prev,
                    state=state,
                    live=result.live,
                    ready=result.ready,
                    models=models,
                    max_model_len=max_len,
                    metrics=metrics,
                    metrics_status=result.metrics_status
                    if result.reachable
                    else prev.metrics_status,
                    probe_latency=result.latency,
                    checked_at=result.wall,
                    checked_mono=now,
                    probes=prev.probes + 1,
                    last_error=last_error,
                    problems=result.problems,
                    loading_since=loading_since,
                    circuit=circuit,
                    opened_at=opened_at,
                    probe_failures=probe_failures,
                    call_failures=call_failures,
                    tokens_per_s=rate,
                )
            )

    def record_call(
        self,
        endpoint: str,
        *,
        error: str | None,
        reason: str = "",
        latency: float | None = None,
        ttft: float | None = None,
        now: float | None = None,
    ) -> EndpointHealth:
        """Take a model call's outcome (a passive signal); ``error`` is the error kind or None."""
        now = time.monotonic() if now is None else now
        url = endpoint_url(endpoint)
        with self._lock:
            prev = self._view.get(url) or EndpointHealth(endpoint=url)
            effective = prev.circuit_at(now, self.cooldown)
            changes: dict[str, Any] = {"calls": prev.calls + 1}
            if error is None:
                changes.update(
                    call_failures=0,
                    latency_ewma=_ewma(prev.latency_ewma, latency),
                    ttft_ewma=_ewma(prev.ttft_ewma, ttft),
                )
                if effective is not Circuit.CLOSED:
                    changes.update(
                        circuit=Circuit.CLOSED,
                        opened_at=None,
                        state=HealthState.READY,
                        last_error=None,
                    )
                elif prev.state is HealthState.UNKNOWN:
                    changes["state"] = HealthState.READY
            elif error in HEALTH_ERRORS:
                failures = prev.call_failures + 1
                detail = f"{error}: {reason}" if reason else error
                changes.update(
                    call_failures=failures,
                    call_errors=prev.call_errors + 1,
                    last_call_error=detail,
                )
                if effective is not Circuit.CLOSED or failures >= self.failure_threshold:
                    changes.update(
                        circuit=Circuit.OPEN,
                        opened_at=now,
                        state=HealthState.DOWN,
                        last_error=f"circuit open: {failures} failed calls in a row; last: "
                        f"{detail}",
                    )
            return self._publish(attrs.evolve(prev, **changes))

    def forget(self, endpoint: str) -> None:
        """Drop what is known about ``endpoint``."""
        with self._lock:
            view = dict(self._view)
            view.pop(endpoint_url(endpoint), None)
            self._view = types.MappingProxyType(view)
