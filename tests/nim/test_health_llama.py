"""The catalog and health stages against the real llama.cpp server, for what it exposes.

llama.cpp's OpenAI server (llama-cpp-python) answers ``/v1/models`` (``id``
and ``owned_by``, no ``max_model_len``) and nothing else nimpipe probes:
``/v1/health/*`` and both metrics paths answer 404.  So an answering llama.cpp
is ``ready`` with metrics ``unavailable`` (never ``degraded``), its context
window is unknown to the server (``default``), and it has no loading phase
(the server binds its port once the model is loaded).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nimpipe import FinishReason, Route, Turn
from nimpipe.jaato import _reports
from nimpipe.pipeline import Pipeline
from nimpipe.testing.nim_server import NimServer, closed_port_url
from nimpipe_contrib.nim.catalog import NimCatalog
from nimpipe_contrib.nim.endpoints import endpoints_of
from nimpipe_contrib.nim.health import NimHealth
from nimpipe_contrib.nim.health_settings import HealthSettings
from nimpipe_contrib.nim.monitor import HealthMonitor, wait_until_ready
from nimpipe_contrib.nim.registry import Circuit, HealthState
from nimpipe_contrib.nim.reports import status_report

pytestmark = pytest.mark.llama

PARAMS = {"temperature": 0.0, "max_tokens": 2, "seed": 7}
FAST = {"interval": 0.1, "loading_interval": 0.05, "timeout": 2.0, "cooldown": 0.3}

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def llama_route(server: Any, name: str = "llama") -> Route:
    return Route(name=name, base_url=server.base_url, model=server.model, max_retries=0)


def health_of(pipeline: Pipeline) -> NimHealth:
    plugin = pipeline.plugins.pm.get_plugin("nim_health")
    assert isinstance(plugin, NimHealth)
    return plugin


def test_llama_is_ready_with_metrics_unavailable(llama_server: Any) -> None:
    target = llama_route(llama_server)
    endpoints = endpoints_of([target])
    monitor = HealthMonitor(settings=HealthSettings(), endpoints=lambda: endpoints)
    try:
        (first,) = monitor.probe()
        (second,) = monitor.probe()
    finally:
        monitor.close()
    for health in (first, second):
        assert health.state is HealthState.READY
        assert (health.live, health.ready, health.metrics) == (None, None, None)
        assert health.metrics_status == "unavailable" and health.problems == ()
        assert health.models == ("smollm2",) and health.max_model_len == {}
    report = "\n".join(status_report([{**row_of(first), "routes": ["llama"]}]))
    row = report.splitlines()[1].split()
    assert row[:2] == [llama_server.base_url, "ready"] and row[4] == "smollm2"
    assert row[6:9] == ["n/a", "n/a", "n/a"]
    assert "metrics: unavailable (the server exposes none)" in report
    assert wait_until_ready(target, 5, progress=None).state is HealthState.READY


def row_of(health: Any) -> dict[str, Any]:
    from nimpipe_contrib.nim.reports import status_row

    return status_row(health, HealthSettings())


def test_a_pipeline_on_llama_routes_probes_and_lists_it(
    llama_server: Any, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make_pipeline(
        routes=[llama_route(llama_server)],
        stages={"nim_health": FAST, "nim_catalog": {"cache_dir": str(tmp_path)}},
    )
    health = health_of(pipeline)
    wait_for(lambda: health.registry.snapshot(llama_server.base_url).probes >= 1, "probe")
    result = pipeline.run(Turn.create("Say hi.", params=PARAMS, timeout=120))
    assert result.ok and result.route is not None and result.route.name == "llama"
    snapshot = health.registry.snapshot(llama_server.base_url)
    assert snapshot.state is HealthState.READY and snapshot.latency_ewma is not None

    catalog = pipeline.plugins.pm.get_plugin("nim_catalog")
    assert isinstance(catalog, NimCatalog)
    (info,) = catalog.models()
    assert (info.id, info.owned_by, info.max_model_len) == ("smollm2", "me", None)
    assert (info.context_length, info.context_source) == (32768, "default")
    route = pipeline.config.route("llama")
    assert (route.context_length, route.context_source) == (None, "unknown")

    (row,) = _reports.ask(pipeline, _reports.STATUS_HOOK) or []
    assert row["state"] == "ready" and row["waiting"] is None and row["kv_cache"] is None


def test_llama_wins_over_an_overloaded_or_dead_peer(llama_server: Any, make_pipeline: Any) -> None:
    with NimServer(model="smollm2", waiting_override=8, kv_cache_override=0.95) as busy:
        pipeline = make_pipeline(
            routes=[
                Route(name="busy", base_url=busy.base_url, model="smollm2", max_retries=0),
                Route(name="dead", base_url=closed_port_url(), model="smollm2", max_retries=0),
                llama_route(llama_server),
            ],
            stages={"nim_health": FAST},
        )
        registry = health_of(pipeline).registry
        wait_for(lambda: registry.snapshot(busy.base_url).waiting == 8, "busy probed")
        wait_for(lambda: registry.snapshot(llama_server.base_url).probes >= 1, "llama probed")
        wait_for(
            lambda: all(h.state is not HealthState.UNKNOWN for h in registry.view().values()),
            "every endpoint probed",
        )
        names = [
            pipeline.run(Turn.create(f"Say {i}.", params=PARAMS, timeout=120)).route.name
            for i in range(2)
        ]
        assert names == ["llama"] * 2
        assert busy.count("/v1/chat/completions") == 0


def test_background_probes_never_cut_a_llama_stream_short(
    llama_server: Any, make_pipeline: Any
) -> None:
    # llama-cpp-python interrupts a streaming generation when another request
    # waits for its model lock, as /v1/models does: the probes must hold off.
    pipeline = make_pipeline(
        routes=[llama_route(llama_server)],
        stages={"nim_health": {**FAST, "interval": 0.05, "rare_every": 0}},
    )
    # An interrupted stream ends with [DONE] and no finish reason (read as "stop"), so a
    # stream that must run to max_tokens (end-of-turn tokens suppressed) shows any cut.
    health = health_of(pipeline)
    wait_for(lambda: health.registry.snapshot(llama_server.base_url).probes >= 2, "probes")
    params = {**PARAMS, "max_tokens": 24, "logit_bias": {"0": -100, "2": -100}}
    prompt = "Count from one to twenty in words."
    whole = pipeline.run(Turn.create(prompt, params=params, timeout=120))
    assert whole.finish_reason is FinishReason.LENGTH
    assert whole.response.usage.completion_tokens == params["max_tokens"]
    probes_before = health.registry.snapshot(llama_server.base_url).probes
    stream = pipeline.stream(Turn.create(prompt, params=params, timeout=120))
    streamed = "".join(stream)
    assert health.registry.snapshot(llama_server.base_url).probes > probes_before
    assert stream.result is not None and stream.result.finish_reason is FinishReason.LENGTH
    assert streamed == whole.text  # the same greedy request: the same tokens


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_a_llama_of_its_own_goes_down_and_recovers(llama_server: Any, make_pipeline: Any) -> None:
    from nimpipe.embedded import EmbeddedModel

    port = _free_port()
    model = EmbeddedModel()
    own = model.start(port=port, n_threads=1)
    try:
        pipeline = make_pipeline(
            routes=[llama_route(own, "own"), llama_route(llama_server, "shared")],
            stages={"nim_health": {**FAST, "failure_threshold": 2}},
        )
        registry = health_of(pipeline).registry
        url = own.base_url

        def turns(n: int) -> list[str]:
            return [
                pipeline.run(Turn.create(f"Say {i}.", params=PARAMS, timeout=120)).route.name
                for i in range(n)
            ]

        wait_for(lambda: registry.snapshot(url).state is HealthState.READY, "ready")
        wait_for(lambda: registry.snapshot(llama_server.base_url).probes >= 1, "shared probed")
        assert sorted(turns(2)) == ["own", "shared"]  # idle peers take turns

        own.stop()
        wait_for(lambda: registry.snapshot(url).state is HealthState.DOWN, "down")
        assert turns(1) == ["shared"]
        wait_for(lambda: registry.snapshot(url).circuit is Circuit.OPEN, "circuit open")
        assert f"connection refused at {url}" in (registry.snapshot(url).last_error or "")

        own = model.start(port=port, n_threads=1)
        wait_for(lambda: registry.snapshot(url).state is HealthState.READY, "recovered")
        assert registry.snapshot(url).circuit is Circuit.CLOSED
        assert sorted(turns(2)) == ["own", "shared"]
    finally:
        own.stop()
