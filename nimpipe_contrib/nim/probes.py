"""What one probe of an endpoint sees: its four replies, and the state they add up to.

A probe asks ``/v1/health/live``, ``/v1/health/ready``, ``/v1/models`` and
the metrics (``/v1/metrics``, or the server root's ``/metrics`` where vLLM
serves them).  :func:`interpret_probe` turns the replies into a
:class:`ProbeResult`; it is pure (no I/O) and never raises: a malformed
reply is a reason for ``degraded``, a 404 is "not offered" (llama.cpp has
no health or metrics endpoints), not a fault.  Sending the requests is
:mod:`nimpipe_contrib.nim.prober`'s job.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import attrs

from nimpipe.errors import PrometheusParseError
from nimpipe_contrib.nim.endpoints import ModelCard, parse_model_list
from nimpipe_contrib.nim.metrics import ServerMetrics, read_server_metrics
from nimpipe_contrib.nim.registry import HealthState

__all__ = ["ProbeResult", "Reply", "interpret_probe"]


@attrs.frozen(kw_only=True)
class Reply:
    """One probe request's outcome: an HTTP answer, or ``error`` when none came."""

    url: str
    status: int | None = None
    body: bytes = b""
    content_type: str = ""
    error: str | None = None
    #: False when the probe did not send this request (see ``prober.ProbePlan``).
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
            server_metrics = read_server_metrics(metrics.body)
            metrics_status = "ok"
        except PrometheusParseError as exc:
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
