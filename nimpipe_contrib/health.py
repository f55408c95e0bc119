"""Contrib stage ``nim_health``: a health registry per endpoint, and routing on NIM's own load.

Enable it with a ``[stages.nim_health]`` table (all settings optional)::

    [stages.nim_health]
    interval = 5               # seconds between probes of a ready endpoint (0: none)
    loading_interval = 1       # seconds between probes of a loading or unprobed endpoint
    timeout = 2                # seconds per probe request
    failure_threshold = 3      # consecutive failures that open an endpoint's circuit
    cooldown = 10              # seconds an open circuit waits before its half-open probe
    probe = "self_hosted"      # which endpoints the background probes: self_hosted, all, none
    wait_for_ready = 0         # seconds a turn waits for a loading endpoint (0: never waits)
    progress_every = 10        # seconds between "waiting for NIM" lines
    overload_waiting = 4       # queue depth shown as "overloaded"
    overload_kv_cache = 0.9    # KV-cache use shown as "overloaded"
    require_listed_model = true  # skip a route whose model the endpoint does not list
    rare_every = 300           # seconds between /v1/models requests to llama.cpp-like servers

**Probes.**  A background scheduler thread asks every watched endpoint for
``/v1/health/live``, ``/v1/health/ready``, ``/v1/models`` and
``/v1/metrics`` (falling back to the server root's ``/metrics``, where vLLM
serves it), every request at once on a pool of threads sharing one ``httpx``
client (see :class:`Prober`), each endpoint on its own schedule, and parses
the metrics with :mod:`nimpipe_contrib.prometheus`, accepting NIM's names and
the ``vllm:``-prefixed ones.  A server with no health endpoints (llama.cpp)
is asked for ``/v1/models`` and metrics only now and then, never while a
call is in flight there (see :meth:`HealthMonitor.plan`).  Self-hosted endpoints are watched by
default (a route's ``self_hosted`` setting, or a loopback or private
address); hosted ones rely on passive signals unless ``probe = "all"``;
offline, only local endpoints are asked.

**Registry.**  Each endpoint is ``unknown``, ``loading`` (live, not ready),
``ready``, ``degraded`` (it answers, but something is wrong: a malformed
reply, a failed readiness check, a missing answer) or ``down`` (no answer,
or its circuit is open).  A circuit breaker opens after
``failure_threshold`` consecutive failures (failed probes, or model calls
failing as unavailable, timed out or malformed), and after ``cooldown``
seconds a half-open probe closes it again if the endpoint answers (an
endpoint that is not probed admits one trial call instead).  Model calls
feed passive signals through ``record_cost``: errors, latency and time to
first token.  An endpoint that serves no health endpoints (llama.cpp, whose
``/v1/health/*`` and metrics answer 404) is ``ready`` when ``/v1/models``
answers, with metrics ``unavailable``: a missing endpoint is not a fault.

**Routing** (``filter_routes`` and ``select_provider``, which only read the
registry: no request on a turn's path).  Routes whose endpoint is down,
loading or has an open circuit are dropped; among routes that serve the
same model at the same tier (peers), the least loaded is chosen:
``num_requests_waiting + gpu_cache_usage_perc + (num_requests_running +
calls in flight from this pipeline) / num_request_max``, ties taking turns.
A named route (``turn.route``) is one of its peers: a turn for a route
whose model another route also serves may go to that one.  When no peer
of the turn's route is usable, the peers are kept (the call then fails with
the server's own error) rather than silently switching to another model.

**Waiting for a container.**  :func:`wait_until_ready` (and
:meth:`NimHealth.wait_until_ready`) blocks until an endpoint is ready,
printing ``waiting for NIM at URL: loading model, 40 s`` lines, and raises
:class:`~nimpipe.errors.UnavailableError` naming the route on timeout; call
it at start-up (a CLI, jaato's ``connect``).  With ``wait_for_ready = N`` a
turn whose every peer is loading (or not yet probed) waits up to ``N``
seconds (within the turn's deadline) for the background probes to see one
ready; ``configure`` never waits.

**Server token counters.**  ``registry.snapshot(endpoint).prompt_tokens_total``
and ``generation_tokens_total`` (and :meth:`NimHealth.server_tokens`) give
the server's own counters to a cost stage.

``nimpipe status [--watch] [--json]`` (:func:`run_status_command`) and
jaato's ``nim-status`` (hook ``nim_status``) show the same registry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import functools
import itertools
import json
import logging
import math
import sys
import threading
import time
import types
from collections import deque
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._markers import hookimpl, hookspec
from nimpipe.errors import UnavailableError
from nimpipe.hosts import host_of, is_private_address
from nimpipe.types import Attempt, CallRecord, Route, Turn
from nimpipe_contrib import prometheus
from nimpipe_contrib._nim import (
    Endpoint,
    ModelCard,
    endpoint_url,
    endpoints_of,
    format_error,
    parse_model_list,
)
from nimpipe_contrib._settings import StageSettings
from nimpipe_contrib.catalog import declare_hooks

if TYPE_CHECKING:
    import argparse

    import pluggy

    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline

__all__ = [
    "STAGE_NAME",
    "Circuit",
    "EndpointHealth",
    "HealthMonitor",
    "HealthRegistry",
    "HealthSettings",
    "HealthState",
    "NimHealth",
    "ProbePlan",
    "ProbeResult",
    "Reply",
    "ServerMetrics",
    "create_plugin",
    "interpret_probe",
    "run_status_command",
    "status_report",
    "wait_until_ready",
]

#: The stage's name in ``CONTRIB_STAGES`` and ``[stages.NAME]``.
STAGE_NAME = "nim_health"

#: Error kinds of a model call that count against an endpoint's health.
HEALTH_ERRORS = frozenset({"unavailable", "timeout", "malformed_reply"})

log = logging.getLogger("nimpipe.health")


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


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class HealthSettings:
    """The ``[stages.nim_health]`` settings."""

    #: Seconds between background probes of a ready endpoint (0: none).
    interval: float = 5.0
    #: Seconds between probes of a loading or never-probed endpoint.
    loading_interval: float = 1.0
    #: Seconds allowed for one probe request.
    timeout: float = 2.0
    #: Consecutive failures that open an endpoint's circuit.
    failure_threshold: int = 3
    #: Seconds an open circuit waits before the half-open probe.
    cooldown: float = 10.0
    #: Endpoints the background probes: ``self_hosted``, ``all`` or ``none``.
    probe: str = "self_hosted"
    #: Seconds a turn waits for a loading endpoint (0: never).
    wait_for_ready: float = 0.0
    #: Seconds between two "waiting for NIM" progress lines.
    progress_every: float = 10.0
    #: Queue depth (``num_requests_waiting``) shown as overloaded.
    overload_waiting: float = 4.0
    #: KV-cache use (0..1) shown as overloaded.
    overload_kv_cache: float = 0.9
    #: Skip a route whose model the endpoint's ``/v1/models`` does not list.
    require_listed_model: bool = True
    #: Seconds between ``/v1/models`` and metrics requests to a server with no
    #: health endpoints (llama.cpp), which are never sent while a call is in flight.
    rare_every: float = 300.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str | None = None) -> HealthSettings:
        """Read and validate a ``[stages.nim_health]`` table."""
        reader = StageSettings(STAGE_NAME, table, source, f"stages.{STAGE_NAME}")
        reader.only(attrs.fields_dict(cls))
        return cls(
            interval=reader.number("interval", 5.0),
            loading_interval=reader.number("loading_interval", 1.0, minimum=0.01),
            timeout=reader.number("timeout", 2.0, minimum=0.01),
            failure_threshold=reader.integer("failure_threshold", 3, minimum=1),
            cooldown=reader.number("cooldown", 10.0),
            probe=reader.choice("probe", ("self_hosted", "all", "none"), "self_hosted"),
            wait_for_ready=reader.number("wait_for_ready", 0.0),
            progress_every=reader.number("progress_every", 10.0),
            overload_waiting=reader.number("overload_waiting", 4.0),
            overload_kv_cache=reader.number("overload_kv_cache", 0.9),
            require_listed_model=reader.boolean("require_listed_model", True),
            rare_every=reader.number("rare_every", 300.0),
        )


# --------------------------------------------------------------------------
# What a probe sees
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ServerMetrics:
    """The figures nimpipe reads from an endpoint's Prometheus metrics (``None``: absent)."""

    waiting: float | None = None
    running: float | None = None
    #: ``num_request_max``: requests the server runs at once.
    max_running: float | None = None
    #: ``gpu_cache_usage_perc`` (``vllm:kv_cache_usage_perc``), a fraction 0..1.
    kv_cache: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    #: Mean time to first token, seconds (histogram sum / count).
    ttft_mean: float | None = None
    #: Mean time per output token, seconds.
    tpot_mean: float | None = None
    #: Mean end-to-end request latency, seconds.
    e2e_mean: float | None = None

    @classmethod
    def from_metrics(cls, metrics: prometheus.Metrics) -> ServerMetrics:
        """Pick NIM's figures out of a parsed exposition (NIM or ``vllm:`` names)."""

        def names(*bases: str) -> list[str]:
            return [p + b for b in bases for p in ("", "vllm:")]

        def total(*bases: str) -> float | None:
            for name in names(*bases):
                value = metrics.value(name)
                if value is not None:
                    return value
            return None

        def largest(*bases: str) -> float | None:
            for name in names(*bases):
                value = metrics.max(name)
                if value is not None:
                    return value
            return None

        def mean(base: str) -> float | None:
            for name in names(base):
                family = metrics.family(name)
                if family is not None:
                    return family.mean()
            return None

        return cls(
            waiting=total("num_requests_waiting"),
            running=total("num_requests_running"),
            max_running=largest("num_request_max"),
            kv_cache=largest("gpu_cache_usage_perc", "kv_cache_usage_perc"),
            prompt_tokens_total=total("prompt_tokens_total"),
            generation_tokens_total=total("generation_tokens_total"),
            ttft_mean=mean("time_to_first_token_seconds"),
            tpot_mean=mean("time_per_output_token_seconds"),
            e2e_mean=mean("e2e_request_latency_seconds"),
        )


@attrs.frozen(kw_only=True)
class Reply:
    """One probe request's outcome: an HTTP answer, or ``error`` when none came."""

    url: str
    status: int | None = None
    body: bytes = b""
    content_type: str = ""
    error: str | None = None
    #: False when the probe did not send this request (see :class:`ProbePlan`).
    asked: bool = True


@attrs.frozen(kw_only=True)
class ProbeResult:
    """One probe of one endpoint, interpreted."""

    endpoint: str
    state: HealthState
    #: ``/v1/health/live`` said 200 (``None``: not offered or no answer).
    live: bool | None = None
    #: ``/v1/health/ready`` said 200 (False: 503 or another failure; ``None``: not offered).
    ready: bool | None = None
    #: The ``/v1/models`` cards (``None``: no valid answer).
    cards: tuple[ModelCard, ...] | None = None
    metrics: ServerMetrics | None = None
    #: ``ok``, ``unavailable`` (404), ``malformed``, ``error`` or ``unknown``.
    metrics_status: str = "unknown"
    #: Seconds the probe took (its requests run concurrently).
    latency: float = 0.0
    #: Whether any request got an HTTP answer.
    reachable: bool = False
    #: Why the endpoint is down or loading, in words.
    error: str | None = None
    #: What is wrong with an endpoint that answers (the reasons for ``degraded``).
    problems: tuple[str, ...] = ()
    #: The readiness check's own message (NIM: "Service is not ready: model is loading.").
    message: str | None = None
    #: Where the metrics were found, for the next probe.
    metrics_url: str | None = None
    #: Whether the server has ``/v1/health/*`` (False: both answered 404; None: unknown).
    health_checks: bool | None = None
    #: ``time.monotonic()`` and ``time.time()`` when the probe ended.
    at: float = attrs.field(factory=time.monotonic)
    wall: float = attrs.field(factory=time.time)


def _json_body(reply: Reply) -> tuple[Any, str | None]:
    """The parsed body of a reply that says it is JSON: ``(value, problem)``."""
    if not reply.body.strip():
        return None, None
    try:
        return json.loads(reply.body), None
    except ValueError as exc:
        if "json" in reply.content_type.lower():
            return None, f"not JSON ({exc})"
        return None, None


def _path_of(reply: Reply, base: str) -> str:
    return reply.url[len(base) :] if reply.url.startswith(base) else reply.url


def interpret_probe(
    endpoint: str,
    live: Reply,
    ready: Reply,
    models: Reply,
    metrics: Reply,
    *,
    latency: float = 0.0,
) -> ProbeResult:
    """Turn the four replies of a probe into a state; never raises.

    ``down``: no request got an answer, or ``/v1/health/live`` failed.
    ``loading``: live, and ``/v1/health/ready`` answered 503.  ``ready``:
    ready said 200, or the server offers no readiness check (404) and
    ``/v1/models`` answered (or was not asked: its models are known).
    ``degraded``: it answers, but a reply was malformed, a check failed
    otherwise, or a request got no answer.  Replies with ``asked`` false
    count for nothing.
    """
    root = endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint
    replies = [r for r in (live, ready, models, metrics) if r.asked]
    if all(r.status is None for r in replies):
        return ProbeResult(
            endpoint=endpoint,
            state=HealthState.DOWN,
            latency=latency,
            error=(live.error or "no answer").replace(live.url, endpoint),
        )
    problems: list[str] = []

    def no_answer(reply: Reply) -> None:
        problems.append(f"{_path_of(reply, root)}: {reply.error}")

    live_ok: bool | None = None
    if live.status == 200:
        live_ok = True
        _, problem = _json_body(live)
        if problem:
            problems.append(f"malformed {_path_of(live, root)} reply: {problem}")
    elif live.status in (404, 405):
        live_ok = None
    elif live.status is None:
        no_answer(live)
    else:
        live_ok = False

    ready_ok: bool | None = None
    message: str | None = None
    loading = False
    if ready.status is not None and ready.status not in (404, 405):
        body, problem = _json_body(ready)
        if isinstance(body, Mapping) and isinstance(body.get("message"), str):
            message = body["message"]
        if ready.status == 200:
            ready_ok = True
            if problem:
                problems.append(f"malformed {_path_of(ready, root)} reply: {problem}")
        else:
            ready_ok = False
            if ready.status == 503:
                loading = True
            else:
                problems.append(
                    f"{_path_of(ready, root)} answered HTTP {ready.status}"
                    + (f": {message}" if message else "")
                )
    elif ready.status is None:
        no_answer(ready)

    cards: tuple[ModelCard, ...] | None = None
    models_path = _path_of(models, root)
    if not models.asked:
        pass
    elif models.status == 200:
        try:
            cards = tuple(parse_model_list(models.body))
        except ValueError as exc:
            problems.append(f"malformed {models_path} reply: {exc}")
    elif models.status in (401, 403):
        problems.append(f"{models_path} refused the request (HTTP {models.status}): API key?")
    elif models.status is None:
        no_answer(models)
    elif not (loading and models.status == 503) and models.status != 404:
        problems.append(f"{models_path} answered HTTP {models.status}")

    server_metrics: ServerMetrics | None = None
    metrics_status = "unknown"
    metrics_path = _path_of(metrics, root)
    if not metrics.asked:
        metrics_status = "unavailable"
    elif metrics.status == 200:
        try:
            server_metrics = ServerMetrics.from_metrics(prometheus.parse(metrics.body))
            metrics_status = "ok"
        except prometheus.PrometheusParseError as exc:
            metrics_status = "malformed"
            problems.append(f"malformed {metrics_path} reply: {exc}")
    elif metrics.status in (404, 405):
        metrics_status = "unavailable"
    elif metrics.status is None:
        metrics_status = "error"
        no_answer(metrics)
    else:
        metrics_status = "error"
        problems.append(f"{metrics_path} answered HTTP {metrics.status}")

    error: str | None = None
    if live_ok is False and ready_ok is not True:
        state = HealthState.DOWN
        error = f"{_path_of(live, root)} answered HTTP {live.status}: the server is not live"
    elif loading:
        state = HealthState.LOADING
        error = message or "the model is loading"
    elif ready_ok is True or (ready_ok is None and (cards is not None or not models.asked)):
        state = HealthState.DEGRADED if problems else HealthState.READY
    else:
        state = HealthState.DEGRADED
        if ready_ok is None and cards is None and not problems:
            problems.append(
                f"cannot tell whether it is ready: no readiness check and no model list "
                f"({models_path} answered HTTP {models.status})"
            )
    return ProbeResult(
        endpoint=endpoint,
        state=state,
        live=live_ok,
        ready=ready_ok,
        cards=cards,
        metrics=server_metrics,
        metrics_status=metrics_status,
        latency=latency,
        reachable=True,
        error=error,
        problems=tuple(problems),
        message=message,
        metrics_url=metrics.url if metrics_status in ("ok", "malformed") else None,
        health_checks=_health_checks(live, ready),
    )


def _health_checks(live: Reply, ready: Reply) -> bool | None:
    statuses = (live.status, ready.status)
    if all(code in (404, 405) for code in statuses):
        return False
    if any(code is not None and code not in (404, 405) for code in statuses):
        return True
    return None


# --------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------

_PROBE_PATHS = ("/health/live", "/health/ready", "/models", "/metrics")


@attrs.frozen(kw_only=True)
class ProbePlan:
    """Which requests one probe sends (the two health checks always go)."""

    models: bool = True
    metrics: bool = True
    #: Where an earlier probe found the metrics (``None``: ``/v1/metrics``, then ``/metrics``).
    metrics_url: str | None = None


class Prober:
    """Sends probes: every request on a thread of a pool, all on one ``httpx.Client``.

    A probe's requests, and the probes of several endpoints, run at once, so
    probing N endpoints takes about as long as the slowest of them.  A thread
    pool, rather than an asyncio loop with ``httpx.AsyncClient``, because it
    measured faster here: ``benchmarks/probe.py`` (10 endpoints) found 1.3x
    to 1.4x the slowest single probe with threads against 1.8x to 2.7x with
    asyncio, whose per-request CPU cost serialises on the loop.  Thread-safe; ``submit``
    never blocks.
    """

    def __init__(self, timeout: float, *, max_workers: int = 64) -> None:
        import httpx

        self.timeout = timeout
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
            limits=httpx.Limits(max_connections=max_workers, max_keepalive_connections=max_workers),
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="nimpipe-probe"
        )

    def fetch(self, url: str, headers: Mapping[str, str]) -> Reply:
        """One GET; never raises (a failure is a :class:`Reply` with ``error``)."""
        try:
            response = self._client.get(url, headers=dict(headers))
        except Exception as exc:
            return Reply(url=url, error=format_error(exc, url, self.timeout))
        return Reply(
            url=url,
            status=response.status_code,
            body=response.content,
            content_type=response.headers.get("content-type", ""),
        )

    def submit(
        self, endpoint: Endpoint, plan: ProbePlan | None = None
    ) -> concurrent.futures.Future[ProbeResult]:
        """Start a probe of ``endpoint``; the future gives its interpreted result.

        Without a ``metrics_url`` in the plan, ``/v1/metrics`` is tried, then
        the server root's ``/metrics`` on a 404.
        """
        plan = plan or ProbePlan()
        out: concurrent.futures.Future[ProbeResult] = concurrent.futures.Future()
        started = time.perf_counter()
        urls = [endpoint.url + path for path in _PROBE_PATHS]
        if plan.metrics_url is not None:
            urls[3] = plan.metrics_url
        asked = (True, True, plan.models, plan.metrics)
        replies: list[Reply] = [Reply(url=u, asked=False) for u in urls]
        remaining = [sum(asked)]
        lock = threading.Lock()

        def finish() -> None:
            live, ready, models, metrics = replies
            fallback = endpoint.root_url + "/metrics"
            if (
                plan.metrics
                and plan.metrics_url is None
                and metrics.status == 404
                and fallback != metrics.url
            ):
                metrics = self.fetch(fallback, endpoint.headers)
            latency = time.perf_counter() - started
            out.set_result(
                interpret_probe(endpoint.url, live, ready, models, metrics, latency=latency)
            )

        def done(index: int, future: concurrent.futures.Future[Reply]) -> None:
            try:
                replies[index] = future.result()
            except BaseException as exc:  # cancelled at shutdown
                replies[index] = Reply(url=urls[index], error=f"probe cancelled ({exc!r})")
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                try:
                    finish()
                except BaseException as exc:
                    out.set_exception(exc)

        try:
            for index, (url, ask) in enumerate(zip(urls, asked, strict=True)):
                if ask:
                    future = self._pool.submit(self.fetch, url, endpoint.headers)
                    future.add_done_callback(functools.partial(done, index))
        except RuntimeError as exc:  # the pool is shut down
            if not out.done():
                out.set_exception(exc)
        return out

    def close(self) -> None:
        """Wait for requests in flight (at most the timeout), then close the client."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()


def _default_progress(message: str) -> None:
    print(f"nimpipe: {message}", file=sys.stderr, flush=True)


def _waiting_line(url: str, health: EndpointHealth, seconds: float) -> str:
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
        progress: Callable[[str], None] | None = _default_progress,
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
                progress(_waiting_line(endpoint.url, health, now - started))
                reported = now
            if now >= deadline:
                raise UnavailableError(
                    f"NIM at {endpoint.url} is not ready after {timeout:g} s: "
                    f"{_not_ready_reason(health)}",
                    route=route,
                )
            time.sleep(max(0.0, min(step, deadline - now)))


def _serving(health: EndpointHealth) -> bool:
    return health.state is HealthState.READY or (
        health.state is HealthState.DEGRADED and health.ready is not False
    )


def _not_ready_reason(health: EndpointHealth) -> str:
    if health.state is HealthState.LOADING:
        return f"still loading its model ({health.last_error or 'ready check answered 503'})"
    return f"{health.state.value}: {health.last_error or 'no detail'}"


def wait_until_ready(
    target: Route | str,
    timeout: float,
    *,
    progress: Callable[[str], None] | None = _default_progress,
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


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


class StatusHookSpecs:
    """The hook the health stage declares (jaato's ``nim-status`` calls it)."""

    @hookspec
    def nim_status(self, pipeline: Pipeline) -> list[dict[str, Any]] | None:
        """Health and load per route.

        :param pipeline: the running pipeline.
        :return: rows with ``route``, ``state``, ``ready``, ``waiting``,
            ``running``, ``kv_cache`` and ``detail``, plus ``endpoint``,
            ``latency_ms``, ``models``, ``context`` and ``tokens_per_s``.
            *Collected*.
        """


_RANKS = {HealthState.READY: 0, HealthState.UNKNOWN: 1, HealthState.DEGRADED: 2}


@attrs.define(eq=False)
class NimHealth:
    """The ``nim_health`` stage.  Its :attr:`registry` and :attr:`monitor` exist once configured."""

    settings: HealthSettings = attrs.field(factory=HealthSettings)
    #: Where "waiting for NIM" lines go (default: standard error).
    progress: Callable[[str], None] | None = _default_progress
    monitor: HealthMonitor | None = attrs.field(default=None, init=False)
    _pipeline: Pipeline | None = attrs.field(default=None, init=False)
    _pending: dict[str, deque[float]] = attrs.field(factory=dict, init=False)
    _pending_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _turns: Iterator[int] = attrs.field(factory=itertools.count, init=False)
    _reported: dict[str, float] = attrs.field(factory=dict, init=False)
    _last_scores: threading.local = attrs.field(factory=threading.local, init=False)

    @property
    def registry(self) -> HealthRegistry:
        """The health registry (raises before ``configure``)."""
        if self.monitor is None:
            raise RuntimeError("the nim_health stage is not configured")
        return self.monitor.registry

    # ------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        declare_hooks(pluginmanager, StatusHookSpecs, "nim_status")

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
            busy=lambda url: self._pending_count(url, time.monotonic()) > 0,
        )
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
        if self.monitor is None:
            return None
        return self._filter(turn, routes, pipeline, may_wait=self.settings.wait_for_ready > 0)

    @hookimpl
    def select_provider(
        self, turn: Turn, routes: tuple[Route, ...], attempt: Attempt, pipeline: Pipeline
    ) -> Route | None:
        """The least loaded usable peer of the turn's route (first attempt only)."""
        if self.monitor is None or attempt.cause is not None or not routes:
            return None
        intended = self._intended(turn, routes, pipeline)
        if intended is None:
            return None
        peers = [r for r in routes if _peers(r, intended)]
        if not peers:
            return None
        now = time.monotonic()
        if len(peers) == 1:
            # Nothing to choose: default_route picks the intended route if it is there.
            return None if peers[0].name == intended.name else peers[0]
        view = self.registry.view()
        known: tuple[str, dict[str, tuple[int, float]]] | None = getattr(
            self._last_scores, "scores", None
        )
        scores = known[1] if known is not None and known[0] == turn.id else {}
        scored = [(scores.get(r.name) or self._score(r, view, now), r) for r in peers]
        best = min(score for score, _ in scored)
        tied = [r for score, r in scored if score == best]
        return tied[next(self._turns) % len(tied)] if len(tied) > 1 else tied[0]

    @hookimpl(trylast=True)
    def before_call(self, route: Route) -> None:
        """Count the call as in flight at its endpoint until its ``record_cost``.

        ``trylast``: it sees the route other stages settled on, and no later
        implementation can block the call after it was counted.
        """
        if self.monitor is not None:
            self._add_pending(route.base_url, time.monotonic())

    @hookimpl
    def record_cost(self, record: CallRecord, pipeline: Pipeline) -> None:
        """Passive signals: the call's error kind, latency and time to first token."""
        if self.monitor is None:
            return
        url = self._endpoint_of(record, pipeline)
        if url is None:
            return
        if not (record.outcome == "retried" and record.error is not None):
            self._drop_pending(url)
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
    def nim_status(self, pipeline: Pipeline) -> list[dict[str, Any]]:
        """Rows for jaato's ``nim-status``: one per route."""
        if self.monitor is None:
            return []
        rows = []
        for route in pipeline.routes:
            health = self.registry.snapshot(route)
            row = _status_row(health, self.settings)
            state = row["health"]
            detail = [row["endpoint"]]
            if row["latency_ms"] is not None:
                detail.append(f"{row['latency_ms']:.0f} ms")
            if row["context"]:
                detail.append(f"context {row['context']}")
            if row["tokens_per_s"] is not None:
                detail.append(f"{row['tokens_per_s']:.1f} tok/s")
            if row["last_error"]:
                detail.append(row["last_error"])
            rows.append(
                {
                    "route": route.name,
                    "state": state,
                    "ready": health.ready,
                    "waiting": _number(health.waiting),
                    "running": _number(health.running),
                    "kv_cache": _percent(health.kv_cache),
                    "detail": "; ".join(detail),
                    "endpoint": row["endpoint"],
                    "latency_ms": row["latency_ms"],
                    "models": row["models"],
                    "context": row["context"],
                    "tokens_per_s": row["tokens_per_s"],
                }
            )
        return rows

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
        return self._usable(route, self.registry.view(), time.monotonic())

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
        """Block until ``target`` is ready (see :func:`wait_until_ready`)."""
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
            _status_row(self.registry.snapshot(e.url), self.settings, e)
            for e in monitor.endpoints()
        ]

    # ------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------

    def _require_monitor(self) -> HealthMonitor:
        if self.monitor is None:
            raise RuntimeError("the nim_health stage is not configured")
        return self.monitor

    def _pass_models_on(self, url: str, cards: Sequence[ModelCard]) -> None:
        pipeline = self._pipeline
        if pipeline is None:
            return
        catalog = pipeline.plugins.pm.get_plugin("nim_catalog")
        observe = getattr(catalog, "observe", None)
        if callable(observe):
            observe(url, cards)

    def _usable(self, route: Route, view: Mapping[str, EndpointHealth], now: float) -> bool:
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

    def _score(
        self, route: Route, view: Mapping[str, EndpointHealth], now: float
    ) -> tuple[int, float]:
        url = endpoint_url(route.base_url)
        health = view.get(url)
        pending = self._pending_count(url, now)
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

    def _filter(
        self, turn: Turn, routes: tuple[Route, ...], pipeline: Pipeline, *, may_wait: bool
    ) -> tuple[Route, ...] | Awaitable[tuple[Route, ...] | None] | None:
        now = time.monotonic()
        view = self.registry.view()
        usable = {r.name: self._usable(r, view, now) for r in routes}
        intended = self._intended(turn, routes, pipeline)
        keep = dict(usable)
        if intended is not None:
            peers = [r for r in routes if _peers(r, intended)]
            if may_wait and peers and self._worth_waiting(peers, view, now):
                return self._wait_then_filter(turn, routes, pipeline, intended, peers)
            if peers and not any(usable[p.name] for p in peers):
                for peer in peers:
                    keep[peer.name] = True
        kept = [r for r in routes if keep[r.name]]
        ordered = self._order(turn, kept, view, now)
        return None if tuple(ordered) == routes else tuple(ordered)

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
        # select_provider runs next on this thread for the same turn: it reuses these.
        self._last_scores.scores = (turn.id, scores)
        return ordered

    def _worth_waiting(
        self, peers: Sequence[Route], view: Mapping[str, EndpointHealth], now: float
    ) -> bool:
        """Whether no peer is usable yet but a watched one is loading or not yet probed."""
        watched = {e.url for e in self._require_monitor().watched()}
        coming = False
        for peer in peers:
            url = endpoint_url(peer.base_url)
            health = view.get(url)
            if health is None or health.probes == 0:
                if url in watched:
                    coming = True  # its first probe is on the way
                    continue
            elif url in watched and health.state is HealthState.LOADING:
                coming = True
                continue
            if self._usable(peer, view, now):
                return False
        return coming

    async def _wait_then_filter(
        self,
        turn: Turn,
        routes: tuple[Route, ...],
        pipeline: Pipeline,
        intended: Route,
        peers: Sequence[Route],
    ) -> tuple[Route, ...] | None:
        monitor = self._require_monitor()
        budget = self.settings.wait_for_ready
        remaining = turn.remaining()
        if remaining is not None:
            budget = min(budget, max(remaining, 0.0))
        started = time.monotonic()
        deadline = started + budget
        monitor.wake()
        while True:
            view = self.registry.view()
            now = time.monotonic()
            if not self._worth_waiting(peers, view, now):
                result = self._filter(turn, routes, pipeline, may_wait=False)
                assert not isinstance(result, Awaitable)
                return result
            health = view.get(endpoint_url(intended.base_url)) or EndpointHealth(
                endpoint=endpoint_url(intended.base_url)
            )
            if now >= deadline:
                raise UnavailableError(
                    f"NIM at {health.endpoint} is not ready after waiting {budget:g} s "
                    f"(wait_for_ready): {_not_ready_reason(health)}",
                    route=intended,
                )
            self._report_waiting(health, now)
            await asyncio.sleep(min(0.05, max(deadline - now, 0.0)))

    def _report_waiting(self, health: EndpointHealth, now: float) -> None:
        if self.progress is None:
            return
        last = self._reported.get(health.endpoint)
        if last is not None and now - last < self.settings.progress_every:
            return
        self._reported[health.endpoint] = now
        since = health.loading_since if health.loading_since is not None else now
        self.progress(_waiting_line(health.endpoint, health, now - since))

    def _endpoint_of(self, record: CallRecord, pipeline: Pipeline) -> str | None:
        route = pipeline.config.routes.get(record.route)
        if route is not None:
            return endpoint_url(route.base_url)
        for endpoint in endpoints_of(pipeline.routes):
            host = endpoint.url.split("://", 1)[-1].split("/", 1)[0]
            if host == record.provider:
                return endpoint.url
        return None

    def _add_pending(self, base_url: str, now: float) -> None:
        url = endpoint_url(base_url)
        with self._pending_lock:
            self._pending.setdefault(url, deque()).append(now)

    def _drop_pending(self, url: str) -> None:
        with self._pending_lock:
            queue = self._pending.get(url)
            if queue:
                queue.popleft()

    def _pending_count(self, url: str, now: float) -> int:
        queue = self._pending.get(url)
        if not queue:
            return 0
        horizon = now - 600.0
        with self._pending_lock:
            while queue and queue[0] < horizon:
                queue.popleft()
            return len(queue)


def _peers(route: Route, other: Route) -> bool:
    return route.model == other.model and route.tier == other.tier


def create_plugin() -> NimHealth:
    """The stage object registered as ``nim_health`` (one per pipeline)."""
    return NimHealth()


# --------------------------------------------------------------------------
# ``nimpipe status``
# --------------------------------------------------------------------------


def _number(value: float | None) -> int | float | None:
    if value is None or math.isnan(value):
        return None
    return int(value) if float(value).is_integer() else round(value, 2)


def _percent(value: float | None) -> str | None:
    if value is None or math.isnan(value):
        return None
    return f"{value * 100:.0f}%"


def _status_row(
    health: EndpointHealth, settings: HealthSettings, endpoint: Endpoint | None = None
) -> dict[str, Any]:
    state = health.state.value
    if health.state is HealthState.READY and health.overloaded(settings):
        state = "ready (overloaded)"
    contexts = sorted(set(health.max_model_len.values()))
    return {
        "endpoint": health.endpoint,
        "routes": list(endpoint.routes) if endpoint else [],
        "self_hosted": (endpoint.self_hosted or endpoint.local) if endpoint else None,
        "health": state,
        "state": health.state.value,
        "overloaded": health.overloaded(settings),
        "circuit": health.circuit.value,
        "live": health.live,
        "ready": health.ready,
        "latency_ms": None if health.probe_latency is None else health.probe_latency * 1000,
        "models": list(health.models),
        "context": contexts[0] if len(contexts) == 1 else (contexts or None),
        "waiting": _number(health.waiting),
        "running": _number(health.running),
        "kv_cache": health.kv_cache,
        "tokens_per_s": health.tokens_per_s,
        "prompt_tokens_total": _number(health.prompt_tokens_total),
        "generation_tokens_total": _number(health.generation_tokens_total),
        "metrics": health.metrics_status,
        "call_latency_ms": None if health.latency_ewma is None else health.latency_ewma * 1000,
        "ttft_ms": None if health.ttft_ewma is None else health.ttft_ewma * 1000,
        "last_error": health.last_error,
        "problems": list(health.problems),
        "checked_at": health.checked_at,
    }


def status_report(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``nimpipe status`` table, with a line under each endpoint that has a problem."""
    header = (
        "endpoint",
        "health",
        "latency",
        "models",
        "context",
        "queue",
        "running",
        "kv-cache",
        "tok/s",
    )

    def fmt(value: Any, unit: str = "") -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
        return f"{value}{unit}"

    body = []
    for row in rows:
        context = row["context"]
        metrics_missing = row["metrics"] in ("unavailable", "malformed", "error")
        body.append(
            [
                row["endpoint"],
                row["health"],
                fmt(row["latency_ms"], " ms"),
                ", ".join(row["models"]) or "-",
                ", ".join(map(str, context)) if isinstance(context, list) else fmt(context),
                "n/a" if metrics_missing and row["waiting"] is None else fmt(row["waiting"]),
                "n/a" if metrics_missing and row["running"] is None else fmt(row["running"]),
                "n/a"
                if metrics_missing and row["kv_cache"] is None
                else (_percent(row["kv_cache"]) or "-"),
                fmt(row["tokens_per_s"]),
            ]
        )
    cells = [list(header), *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for index, cells_row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells_row, widths, strict=True)).rstrip())
        if index == 0:
            continue
        row = rows[index - 1]
        notes = []
        if row["last_error"]:
            notes.append(row["last_error"])
        notes.extend(p for p in row["problems"] if p != row["last_error"])
        if row["metrics"] == "unavailable":
            notes.append("metrics: unavailable (the server exposes none)")
        if row["circuit"] != "closed":
            notes.append(f"circuit {row['circuit']}")
        lines.extend(f"    {note}" for note in notes)
    return lines


def run_status_command(
    config: Config, args: argparse.Namespace, *, samples: int | None = None
) -> int:
    """``nimpipe status [--watch] [--interval S] [--json]``; returns the exit code.

    Probes every endpoint of the configured routes (offline: the local ones)
    and prints endpoint, health, probe latency, models, context, queue depth,
    running requests, KV-cache use and tokens/s (from the second sample on).
    ``--watch`` repeats every ``--interval`` seconds until interrupted (or
    ``samples`` times); with ``--json`` each sample is one JSON document per
    line.  Exit code: 0 when every endpoint is ready, 1 otherwise, 2 with no
    route configured.
    """
    if not config.routes:
        print(
            "nimpipe status: no endpoint is configured: add [routes.NAME] to nimpipe.toml "
            "or set NIMPIPE_BASE_URL and NIMPIPE_MODEL",
            file=sys.stderr,
        )
        return 2
    monitor = HealthMonitor.from_config(config)
    watch = bool(getattr(args, "watch", False))
    interval = max(0.1, float(getattr(args, "interval", 2.0) or 2.0))
    count = samples if samples is not None else (None if watch else 1)
    code = 1
    try:
        taken = 0
        while count is None or taken < count:
            if taken:
                time.sleep(interval)
            monitor.probe()
            rows = [
                _status_row(monitor.registry.snapshot(e.url), monitor.settings, e)
                for e in monitor.endpoints()
            ]
            skipped = [
                e.url for e in monitor.endpoints() if not e.may_probe(offline=monitor.offline())
            ]
            taken += 1
            if args.json:
                payload: Any = rows if not watch else {"time": time.time(), "endpoints": rows}
                print(json.dumps(payload, indent=None if watch else 2), flush=True)
            else:
                if watch:
                    print(time.strftime("%H:%M:%S"), flush=True)
                for line in status_report(rows):
                    print(line, flush=True)
                for url in skipped:
                    print(f"nimpipe status: {url}: not probed (offline)", file=sys.stderr)
            code = 0 if all(r["state"] == "ready" for r in rows) else 1
    except KeyboardInterrupt:
        if not watch:
            raise
    finally:
        monitor.close()
    return code
