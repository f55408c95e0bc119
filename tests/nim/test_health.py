"""The ``nim_health`` stage against real NIM-shaped servers: registry, routing, status, waiting."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.nim import MODEL, route, wait_for

from nimpipe import Route, Turn, hookimpl
from nimpipe.cli import main as cli_main
from nimpipe.config import Config
from nimpipe.errors import ConfigError, UnavailableError
from nimpipe.jaato import _reports
from nimpipe.pipeline import Pipeline
from nimpipe.testing.nim_server import NimServer, closed_port_url
from nimpipe_contrib.nim.commands import run_status_command
from nimpipe_contrib.nim.endpoints import endpoint_url, endpoints_of
from nimpipe_contrib.nim.health import NimHealth
from nimpipe_contrib.nim.health_settings import HealthSettings
from nimpipe_contrib.nim.monitor import HealthMonitor, wait_until_ready
from nimpipe_contrib.nim.probes import ProbeResult, Reply, interpret_probe
from nimpipe_contrib.nim.registry import Circuit, HealthRegistry, HealthState
from nimpipe_contrib.nim.reports import status_report

CHAT = "/v1/chat/completions"
PROBE_PATHS = ("/v1/health/live", "/v1/health/ready", "/v1/models", "/v1/metrics", "/metrics")

#: Probe often and give up fast: the tests watch state changes happen.
FAST = {
    "interval": 0.1,
    "loading_interval": 0.05,
    "timeout": 1.0,
    "cooldown": 0.3,
    "failure_threshold": 2,
}


def stage(pipeline: Pipeline) -> NimHealth:
    plugin = pipeline.plugins.pm.get_plugin("nim_health")
    assert isinstance(plugin, NimHealth)
    return plugin


def monitor_for(*routes: Route, **settings: Any) -> HealthMonitor:
    endpoints = endpoints_of(routes)
    return HealthMonitor(settings=HealthSettings(**settings), endpoints=lambda: endpoints)


def probe_once(*routes: Route, **settings: Any) -> list[Any]:
    monitor = monitor_for(*routes, **settings)
    try:
        return monitor.probe()
    finally:
        monitor.close()


# --------------------------------------------------------------------------
# Reading probes: pure interpretation
# --------------------------------------------------------------------------

URL = "http://10.0.0.5:8000/v1"
MODELS_BODY = json.dumps({"object": "list", "data": [{"id": MODEL, "max_model_len": 8192}]})
METRICS_BODY = (
    "# TYPE num_requests_waiting gauge\nnum_requests_waiting 3\n"
    "# TYPE gpu_cache_usage_perc gauge\ngpu_cache_usage_perc 0.5\n"
)


def ok(path: str, body: str = '{"object": "health.response", "status": "ready"}') -> Reply:
    kind = "text/plain" if path.endswith("metrics") else "application/json"
    return Reply(url=URL + path, status=200, body=body.encode(), content_type=kind)


def status(path: str, code: int, body: str = '{"detail": "Not Found"}') -> Reply:
    return Reply(url=URL + path, status=code, body=body.encode(), content_type="application/json")


def failed(path: str, error: str = "connection refused") -> Reply:
    return Reply(url=URL + path, error=f"{error} at {URL}{path}")


def healthy_replies() -> dict[str, Reply]:
    return {
        "live": ok("/health/live"),
        "ready": ok("/health/ready"),
        "models": ok("/models", MODELS_BODY),
        "metrics": ok("/metrics", METRICS_BODY),
    }


def test_a_nim_that_answers_everything_is_ready() -> None:
    result = interpret_probe(URL, **healthy_replies())
    assert result.state is HealthState.READY and result.problems == ()
    assert result.cards is not None and result.cards[0].max_model_len == 8192
    assert result.metrics is not None and result.metrics.waiting == 3
    assert result.metrics.kv_cache == 0.5


def test_ready_503_is_loading_with_the_server_message() -> None:
    replies = healthy_replies()
    replies["ready"] = status(
        "/health/ready", 503, '{"object": "health.response", "message": "model is loading"}'
    )
    result = interpret_probe(URL, **replies)
    assert result.state is HealthState.LOADING
    assert result.error == "model is loading" and result.ready is False and result.live is True


def test_no_answer_at_all_is_down_naming_the_endpoint() -> None:
    result = interpret_probe(
        URL,
        failed("/health/live"),
        failed("/health/ready"),
        failed("/models"),
        failed("/metrics"),
    )
    assert result.state is HealthState.DOWN and not result.reachable
    assert result.error == f"connection refused at {URL}"


def test_a_server_without_health_or_metrics_is_ready_when_it_lists_models() -> None:
    # llama.cpp: /v1/models only; 404 elsewhere is "not offered", not a fault.
    result = interpret_probe(
        URL,
        status("/health/live", 404),
        status("/health/ready", 404),
        ok("/models", '{"object": "list", "data": [{"id": "smollm2", "object": "model"}]}'),
        status("/metrics", 404),
    )
    assert result.state is HealthState.READY
    assert result.metrics_status == "unavailable" and result.problems == ()
    assert result.live is None and result.ready is None


def test_live_failing_is_down() -> None:
    replies = healthy_replies()
    replies["live"] = status("/health/live", 500, "{}")
    replies["ready"] = status("/health/ready", 500, "{}")
    result = interpret_probe(URL, **replies)
    assert result.state is HealthState.DOWN
    assert "/v1/health/live answered HTTP 500" in (result.error or "")


@pytest.mark.parametrize(
    ("part", "reply", "problem"),
    [
        ("models", ok("/models", "{not json"), "malformed /v1/models reply: not JSON"),
        ("models", ok("/models", '{"data": [{"name": "x"}]}'), "model 0 has no string 'id'"),
        (
            "models",
            ok("/models", '{"data": [{"id": "x", "max_model_len": "big"}]}'),
            "non-negative",
        ),
        (
            "metrics",
            ok("/metrics", "num_requests_waiting{ 3"),
            "malformed /v1/metrics reply: line 1",
        ),
        ("ready", ok("/health/ready", "{oops"), "malformed /v1/health/ready reply: not JSON"),
        (
            "ready",
            status("/health/ready", 500, '{"message": "engine dead"}'),
            "HTTP 500: engine dead",
        ),
        ("metrics", failed("/metrics", "no answer"), "/v1/metrics: no answer"),
        ("models", status("/models", 401, "{}"), "refused the request (HTTP 401)"),
    ],
)
def test_malformed_or_failed_parts_degrade_with_the_reason(
    part: str, reply: Reply, problem: str
) -> None:
    replies = healthy_replies()
    replies[part] = reply
    result = interpret_probe(URL, **replies)
    assert result.state is HealthState.DEGRADED
    assert any(problem in p for p in result.problems), result.problems


# --------------------------------------------------------------------------
# The registry and its circuit breaker
# --------------------------------------------------------------------------


def test_failed_calls_open_the_circuit_and_a_half_open_probe_closes_it() -> None:
    registry = HealthRegistry(failure_threshold=2, cooldown=5.0)
    registry.record_call(URL, error="timeout", reason="no answer in 60 s", now=100.0)
    assert registry.snapshot(URL).circuit is Circuit.CLOSED
    registry.record_call(URL, error="rate_limit", now=100.5)  # not a health failure
    assert registry.snapshot(URL).call_failures == 1
    health = registry.record_call(URL, error="unavailable", reason="HTTP 503", now=101.0)
    assert health.circuit is Circuit.OPEN and health.state is HealthState.DOWN
    assert health.last_error == "circuit open: 2 failed calls in a row; last: unavailable: HTTP 503"
    assert health.circuit_at(105.9, 5.0) is Circuit.OPEN
    assert health.circuit_at(106.0, 5.0) is Circuit.HALF_OPEN

    # A probe that answers before the cool-down leaves it open ...
    early = registry.apply(
        ProbeResult(endpoint=URL, state=HealthState.READY, reachable=True, at=103)
    )
    assert early.circuit is Circuit.OPEN and early.state is HealthState.DOWN
    # ... a failed half-open probe opens it again ...
    again = registry.apply(ProbeResult(endpoint=URL, state=HealthState.DOWN, at=107.0))
    assert again.circuit is Circuit.OPEN and again.opened_at == 107.0
    # ... and one that answers after the cool-down closes it.
    closed = registry.apply(
        ProbeResult(endpoint=URL, state=HealthState.READY, reachable=True, at=112)
    )
    assert closed.circuit is Circuit.CLOSED and closed.state is HealthState.READY
    assert closed.call_failures == 0


def test_probes_that_find_nothing_open_the_circuit_too() -> None:
    registry = HealthRegistry(failure_threshold=3, cooldown=1.0)
    for at in (1.0, 2.0):
        health = registry.apply(ProbeResult(endpoint=URL, state=HealthState.DOWN, at=at))
        assert health.state is HealthState.DOWN and health.circuit is Circuit.CLOSED
    health = registry.apply(ProbeResult(endpoint=URL, state=HealthState.DOWN, at=3.0))
    assert health.circuit is Circuit.OPEN and health.probe_failures == 3


def test_successful_calls_record_latency_and_ttft() -> None:
    registry = HealthRegistry()
    registry.record_call(URL, error=None, latency=0.2, ttft=0.05)
    health = registry.record_call(URL, error=None, latency=0.4, ttft=None)
    assert health.state is HealthState.READY  # a call that worked says so
    assert health.latency_ewma == pytest.approx(0.26) and health.ttft_ewma == 0.05
    assert health.calls == 2 and health.call_errors == 0


# --------------------------------------------------------------------------
# Probing real servers
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "params", "problem"),
    [
        ("/v1/models", "malformed", {}, "malformed /v1/models reply: not JSON"),
        ("/v1/models", "malformed_shape", {}, "malformed /v1/models reply: no 'data' list"),
        ("/v1/metrics", "malformed", {}, "malformed /v1/metrics reply: line 1: expected a metric"),
        ("/v1/health/ready", "malformed", {}, "malformed /v1/health/ready reply: not JSON"),
        ("/v1/health/live", "malformed", {}, "malformed /v1/health/live reply: not JSON"),
        ("/v1/health/ready", "status", {"status": 500}, "/v1/health/ready answered HTTP 500"),
        ("/v1/metrics", "drop", {}, "/v1/metrics: "),
        ("/v1/metrics", "stall", {"stall_seconds": 3}, "no answer from"),
    ],
)
def test_malformed_replies_give_degraded_with_a_clear_reason(
    path: str, kind: str, params: dict[str, Any], problem: str
) -> None:
    with NimServer() as server:
        server.inject(kind, count=None, path=path, **params)
        (health,) = probe_once(route("a", server), timeout=0.5)
    assert health.state is HealthState.DEGRADED
    assert health.last_error is not None
    assert any(problem in p for p in health.problems), health.problems


def test_metrics_fall_back_to_the_root_and_vllm_names_are_read() -> None:
    with NimServer(metrics_prefix="vllm:", waiting_override=5, kv_cache_override=0.25) as server:
        server.inject("status", count=None, path="/v1/metrics", status=404)
        monitor = monitor_for(route("a", server))
        try:
            (first,) = monitor.probe()
            (second,) = monitor.probe()
        finally:
            monitor.close()
        assert first.metrics_status == "ok" and first.waiting == 5 and first.kv_cache == 0.25
        assert second.state is HealthState.READY
        # The second probe went straight to where the first found the metrics.
        assert server.count("/v1/metrics") == 1 and server.count("/metrics") == 2


def test_a_server_without_health_endpoints_is_asked_for_models_rarely_and_never_when_busy() -> None:
    # Shaped like llama.cpp: 404 for /v1/health/* and metrics.  Its /v1/models
    # waits for the model lock and interrupts a streaming generation.
    with NimServer() as server:
        for path in ("/v1/health/live", "/v1/health/ready", "/v1/metrics", "/metrics"):
            server.inject("status", count=None, path=path, status=404)
        busy = {"now": False}
        target = route("llama-like", server)
        endpoints = endpoints_of([target])
        monitor = HealthMonitor(
            settings=HealthSettings(rare_every=0.2),
            endpoints=lambda: endpoints,
            busy=lambda url: busy["now"],
        )
        try:
            first, second = monitor.probe()[0], monitor.probe()[0]
            assert server.count("/v1/models") == 1 and server.count("/v1/metrics") == 1
            assert first.state is second.state is HealthState.READY
            assert second.models == (MODEL,) and second.metrics_status == "unavailable"
            assert second.problems == ()
            time.sleep(0.25)
            busy["now"] = True
            monitor.probe()
            assert server.count("/v1/models") == 1  # a call is in flight: not now
            busy["now"] = False
            monitor.probe()
            assert server.count("/v1/models") == 2
        finally:
            monitor.close()


def test_server_token_counters_and_tokens_per_second(make_pipeline: Any) -> None:
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route("a", server)], stages={"nim_health": {"interval": 0, "timeout": 1}}
        )
        health = stage(pipeline)
        health.probe()
        results = [
            pipeline.run(Turn.create(f"count these {i} words", timeout=30)) for i in range(3)
        ]
        (snapshot,) = health.probe()
        prompt = sum(r.records[0].prompt_tokens for r in results)
        generated = sum(r.records[0].completion_tokens for r in results)
        assert health.server_tokens(pipeline.config.route("a")) == (prompt, generated)
        assert snapshot.prompt_tokens_total == prompt
        assert snapshot.tokens_per_s is not None and snapshot.tokens_per_s > 0


def test_self_hosted_detection_decides_what_is_probed_in_the_background() -> None:
    hosts = {
        "v4": "http://127.0.0.1:8000/v1",
        "v6": "http://[::1]:8000/v1",
        "ten": "http://10.1.2.3:8000/v1",
        "172": "http://172.20.0.5:8000/v1",
        "192": "http://192.168.1.9:8000/v1",
        "link": "http://169.254.1.1:8000/v1",
        "public_ip": "http://8.8.8.8:8000/v1",
        "not_private_172": "http://172.32.0.1:8000/v1",
        "dns": "http://nim.internal:8000/v1",
        "hosted": "https://integrate.api.nvidia.com/v1",
    }
    routes: dict[str, Any] = {
        name: {"base_url": url, "model": MODEL} for name, url in hosts.items()
    }
    routes["dns_said"] = {
        "base_url": "http://nim.example:8000/v1",
        "model": MODEL,
        "self_hosted": True,
    }
    config = Config.from_dict({"routes": routes}, env={})
    watched = {e.routes[0] for e in HealthMonitor.from_config(config).watched()}
    assert watched == {"v4", "v6", "ten", "172", "192", "link", "dns_said"}

    everything = Config.from_dict(
        {"routes": routes, "stages": {"nim_health": {"probe": "all"}}}, env={}
    )
    assert len(HealthMonitor.from_config(everything).watched()) == len(routes)
    offline = attrs_offline(everything)
    assert {e.routes[0] for e in HealthMonitor.from_config(offline).watched()} == watched


def attrs_offline(config: Config) -> Config:
    import attrs

    return attrs.evolve(config, offline=True)


def test_offline_probes_only_local_endpoints() -> None:
    with NimServer() as server:
        config = Config.from_dict(
            {
                "offline": True,
                "routes": {
                    "local": {"base_url": server.base_url, "model": MODEL},
                    "hosted": {"base_url": "https://integrate.api.nvidia.com/v1", "model": MODEL},
                },
            },
            env={},
        )
        monitor = HealthMonitor.from_config(config)
        try:
            results = monitor.probe()
        finally:
            monitor.close()
    assert [h.endpoint for h in results] == [server.base_url]


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"stages\.nim_health\.probe"):
        HealthSettings.from_table({"probe": "sometimes"})
    with pytest.raises(ConfigError, match=r"stages\.nim_health\.intervall"):
        HealthSettings.from_table({"intervall": 1})


# --------------------------------------------------------------------------
# The stage in a pipeline: routing on health and load
# --------------------------------------------------------------------------


def chat_counts(*servers: Any) -> list[int]:
    return [s.count(CHAT) for s in servers]


def run_turns(pipeline: Pipeline, n: int, *servers: Any) -> list[int]:
    before = chat_counts(*servers)
    for i in range(n):
        pipeline.run(Turn.create(f"turn {i}", timeout=30))
    return [after - b for after, b in zip(chat_counts(*servers), before, strict=True)]


def status_of(pipeline: Pipeline, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """The stage's own report and the ``nimpipe status`` command's output, same config."""
    report = "\n".join(status_report(stage(pipeline).status()))
    args = argparse.Namespace(watch=False, interval=1.0, json=False)
    capsys.readouterr()
    run_status_command(pipeline.config, args)
    return report, capsys.readouterr().out


def line_of(text: str, url: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(url))


def test_loading_ready_overloaded_down_recovered(
    make_pipeline: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with NimServer() as peer, NimServer() as subject:
        subject.set_ready(False)
        pipeline = make_pipeline(
            routes=[route("subject", subject), route("peer", peer)],
            stages={"nim_health": FAST},
        )
        registry = stage(pipeline).registry
        url = subject.base_url

        def state() -> HealthState:
            return registry.snapshot(url).state

        # 1. loading: live but not ready; every turn goes to the peer.
        wait_for(lambda: state() is HealthState.LOADING, "loading")
        wait_for(lambda: registry.snapshot(peer.base_url).state is HealthState.READY, "peer ready")
        assert run_turns(pipeline, 6, subject, peer) == [0, 6]
        report, cli = status_of(pipeline, capsys)
        assert "loading" in line_of(report, url) and "loading" in line_of(cli, url)
        assert "Service is not ready: model is loading." in report

        # 2. ready: the two idle endpoints take turns.
        subject.set_ready(True)
        wait_for(lambda: state() is HealthState.READY, "ready")
        to_subject, to_peer = run_turns(pipeline, 8, subject, peer)
        assert to_subject >= 2 and to_peer >= 2
        report, cli = status_of(pipeline, capsys)
        assert line_of(cli, url).split()[1] == "ready"

        # 3. overloaded: a long queue and a full KV cache; new turns avoid it.
        subject.configure(waiting_override=12, kv_cache_override=0.95)
        wait_for(lambda: registry.snapshot(url).waiting == 12, "queue seen")
        assert run_turns(pipeline, 8, subject, peer) == [0, 8]
        assert registry.snapshot(url).state is HealthState.READY
        report, cli = status_of(pipeline, capsys)
        for text in (report, cli):
            row = line_of(text, url)
            assert "ready (overloaded)" in row and " 12 " in row and "95%" in row

        # 4. down: the server is gone; the circuit opens after two failed probes.
        subject.stop()
        wait_for(lambda: state() is HealthState.DOWN, "down")
        assert run_turns(pipeline, 6, subject, peer) == [0, 6]
        wait_for(lambda: registry.snapshot(url).circuit is Circuit.OPEN, "circuit open")
        report, cli = status_of(pipeline, capsys)
        assert line_of(report, url).split()[1] == "down"
        assert f"connection refused at {url}" in report and "circuit open" in report
        assert line_of(cli, url).split()[1] == "down"

        # 5. recovered: back on the same port; the half-open probe closes the circuit.
        subject.configure(waiting_override=None, kv_cache_override=None)
        subject.start()
        wait_for(lambda: state() is HealthState.READY, "recovered")
        assert registry.snapshot(url).circuit is Circuit.CLOSED
        to_subject, to_peer = run_turns(pipeline, 8, subject, peer)
        assert to_subject >= 2 and to_peer >= 2
        report, cli = status_of(pipeline, capsys)
        assert line_of(cli, url).split()[1] == "ready" and "circuit" not in report


def test_overloaded_endpoint_gets_at_most_a_fifth_of_new_turns(
    make_pipeline: Any, record_property: Callable[[str, object], None]
) -> None:
    turns = 50
    with NimServer(latency=0.02) as busy, NimServer(latency=0.02) as calm:
        busy.configure(waiting_override=8, kv_cache_override=0.95)
        pipeline = make_pipeline(
            routes=[route("busy", busy), route("calm", calm)], stages={"nim_health": FAST}
        )
        registry = stage(pipeline).registry
        wait_for(lambda: registry.snapshot(busy.base_url).waiting == 8, "busy probed")
        wait_for(lambda: registry.snapshot(calm.base_url).state is HealthState.READY, "calm probed")

        def one(i: int) -> str:
            result = pipeline.run(Turn.create(f"turn {i}", timeout=30))
            return result.route.name if result.route else "?"

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            names = list(pool.map(one, range(turns)))
        to_busy, to_calm = chat_counts(busy, calm)
    share = to_busy / turns
    record_property("overloaded_share", share)
    print(f"\noverloaded endpoint got {to_busy} of {turns} turns ({share:.0%})")
    assert to_busy + to_calm == turns and names.count("busy") == to_busy
    assert share <= 0.20


def test_with_fresh_health_a_turn_makes_no_health_or_catalog_request(
    make_pipeline: Any, tmp_path: Path
) -> None:
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route("a", server)],
            stages={
                "nim_health": {"interval": 60, "loading_interval": 60, "timeout": 1},
                "nim_catalog": {"cache_dir": str(tmp_path)},
            },
        )
        health = stage(pipeline)
        wait_for(lambda: health.registry.snapshot(server.base_url).probes == 1, "first probe")
        wait_for(lambda: server.count("/v1/models") == 2, "catalog discovery")  # probe + catalog
        time.sleep(0.1)
        before = server.stats()
        for i in range(20):
            pipeline.run(Turn.create(f"turn {i}", timeout=30))
        assert "".join(pipeline.stream(Turn.create("streamed", timeout=30)))

        async def concurrent_turns() -> None:
            await asyncio.gather(
                *(pipeline.arun(Turn.create(f"a{i}", timeout=30)) for i in range(3))
            )

        asyncio.run(concurrent_turns())
        after = server.stats()
    grown = {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}
    assert grown == {("POST", CHAT): 24}


def test_failed_calls_route_around_an_endpoint_until_it_recovers(make_pipeline: Any) -> None:
    with NimServer() as flaky, NimServer() as steady:
        flaky.inject("status", count=None, status=503, message="engine overloaded")
        pipeline = make_pipeline(
            routes=[route("flaky", flaky), route("steady", steady)],
            stages={"nim_health": {**FAST, "interval": 60}},
        )
        registry = stage(pipeline).registry
        wait_for(lambda: registry.snapshot(flaky.base_url).probes >= 1, "probe")
        wait_for(lambda: registry.snapshot(steady.base_url).probes >= 1, "probe")
        errors = []
        for i in range(8):
            try:
                pipeline.run(Turn.create(f"turn {i}", timeout=30))
            except UnavailableError as exc:
                errors.append(exc)
        health = registry.snapshot(flaky.base_url)
        assert len(errors) == 2  # the failure threshold, then the circuit keeps turns away
        assert errors[0].route is not None and errors[0].route.name == "flaky"
        assert health.circuit is Circuit.OPEN and health.state is HealthState.DOWN
        assert "engine overloaded" in (health.last_error or "")
        assert registry.snapshot(steady.base_url).latency_ewma is not None

        flaky.clear_faults()
        wait_for(lambda: registry.snapshot(flaky.base_url).circuit is Circuit.CLOSED, "closed")
        to_flaky, _ = run_turns(pipeline, 6, flaky, steady)
        assert to_flaky >= 2


def test_a_named_route_that_is_down_goes_to_its_peer(make_pipeline: Any) -> None:
    with NimServer() as peer:
        dead = Route(name="dead", base_url=closed_port_url(), model=MODEL, max_retries=0)
        pipeline = make_pipeline(routes=[dead, route("peer", peer)], stages={"nim_health": FAST})
        registry = stage(pipeline).registry
        wait_for(lambda: registry.snapshot(dead).state is HealthState.DOWN, "down")
        result = pipeline.run(Turn.create("hello", route="dead", timeout=30))
        assert result.route is not None and result.route.name == "peer"


def test_an_unprobed_endpoint_admits_a_trial_call_after_the_cooldown(make_pipeline: Any) -> None:
    with NimServer() as server:
        server.inject("status", count=2, status=503)
        pipeline = make_pipeline(
            routes=[route("hosted", server)],
            stages={"nim_health": {"probe": "none", "cooldown": 0.2, "failure_threshold": 2}},
        )
        health = stage(pipeline)
        target = pipeline.config.route("hosted")
        for _ in range(2):
            with pytest.raises(UnavailableError):
                pipeline.run(Turn.create("hi", timeout=30))
        assert not health.usable(target)
        time.sleep(0.25)
        assert health.usable(target)  # half-open: one trial call may go
        assert pipeline.run(Turn.create("hi", timeout=30)).ok
        assert health.registry.snapshot(target).circuit is Circuit.CLOSED
        assert server.count("/v1/health/ready") == 0


def test_the_stage_tells_other_stages_whether_a_route_is_usable(make_pipeline: Any) -> None:
    with NimServer() as server:
        server.inject("status", count=2, status=503)
        pipeline = make_pipeline(
            routes=[route("hosted", server)],
            stages={"nim_health": {"probe": "none", "cooldown": 0.2, "failure_threshold": 2}},
        )
        target = pipeline.config.route("hosted")
        assert pipeline.plugins.call("route_usable", route=target, pipeline=pipeline) == [True]
        for _ in range(2):
            with pytest.raises(UnavailableError):
                pipeline.run(Turn.create("hi", timeout=30))
        assert pipeline.plugins.call("route_usable", route=target, pipeline=pipeline) == [False]
        time.sleep(0.25)
        assert pipeline.plugins.call("route_usable", route=target, pipeline=pipeline) == [True]


class ModelsSeen:
    """A third-party stage that hears what the health probes' ``/v1/models`` listed."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, tuple[str, ...]]] = []

    @hookimpl
    def nim_models_seen(self, url: str, cards: Any, pipeline: Pipeline) -> None:
        assert isinstance(pipeline, Pipeline)
        self.seen.append((url, tuple(card.id for card in cards)))


def test_probed_models_reach_any_stage_by_hook_without_the_catalog(make_pipeline: Any) -> None:
    with NimServer(models=[MODEL, "other/model"]) as server:
        heard = ModelsSeen()
        pipeline = make_pipeline(
            routes=[route("local", server)], stages={"nim_health": FAST}, plugins=[heard]
        )
        assert pipeline.plugins.pm.get_plugin("nim_catalog") is None
        wait_for(lambda: heard.seen, "models passed on")
        url, ids = heard.seen[0]
        assert url == endpoint_url(server.base_url)
        assert ids == (MODEL, "other/model")
        assert server.count("/v1/models") >= len(heard.seen)


def test_a_route_whose_model_the_endpoint_does_not_list_is_skipped(make_pipeline: Any) -> None:
    with NimServer(model="other/model") as wrong, NimServer() as right:
        pipeline = make_pipeline(
            routes=[route("wrong", wrong), route("right", right)], stages={"nim_health": FAST}
        )
        registry = stage(pipeline).registry
        wait_for(lambda: registry.snapshot(wrong.base_url).models == ("other/model",), "probe")
        wait_for(lambda: registry.snapshot(right.base_url).probes >= 1, "probe")
        assert run_turns(pipeline, 4, wrong, right) == [0, 4]


def test_jaato_nim_status_rows(make_pipeline: Any) -> None:
    with NimServer(waiting_override=3, kv_cache_override=0.5) as server:
        pipeline = make_pipeline(routes=[route("a", server)], stages={"nim_health": FAST})
        wait_for(lambda: stage(pipeline).registry.snapshot(server.base_url).waiting == 3, "probe")
        (row,) = _reports.ask(pipeline, _reports.STATUS_HOOK) or []
    assert row["route"] == "a" and row["state"] == "ready" and row["ready"] is True
    assert row["waiting"] == 3 and row["running"] == 0 and row["kv_cache"] == "50%"
    assert row["endpoint"] == server.base_url and row["models"] == [MODEL]
    assert row["context"] == 131072 and server.base_url in row["detail"]


# --------------------------------------------------------------------------
# Waiting for a container
# --------------------------------------------------------------------------


def test_wait_until_ready_prints_progress_then_returns() -> None:
    with NimServer(ready_after=0.6) as server:
        lines: list[str] = []
        target = route("local", server)
        health = wait_until_ready(
            target, 10, progress=lines.append, interval=0.05, progress_every=0.2
        )
    assert health.state is HealthState.READY
    assert lines[0] == f"waiting for NIM at {server.base_url}: loading model, 0 s"
    assert 2 <= len(lines) <= 6  # throttled
    assert lines[-1].startswith(f"NIM at {server.base_url} is ready after ")


def test_wait_until_ready_times_out_with_a_clear_error_naming_the_route() -> None:
    with NimServer() as server:
        server.set_ready(False)
        target = route("local", server)
        with pytest.raises(UnavailableError) as info:
            wait_until_ready(target, 0.3, progress=None, interval=0.05)
    assert info.value.route is target
    assert str(info.value) == (
        f"route 'local': NIM at {server.base_url} is not ready after 0.3 s: still loading its "
        "model (Service is not ready: model is loading.)"
    )


def test_wait_until_ready_reports_an_endpoint_that_does_not_answer() -> None:
    url = closed_port_url()
    lines: list[str] = []
    with pytest.raises(UnavailableError) as info:
        wait_until_ready(url, 0.2, progress=lines.append, interval=0.05)
    assert "is not ready after 0.2 s: down: " in str(info.value)
    assert f"connection refused at {url}" in str(info.value)
    assert lines == [f"waiting for NIM at {url}: not answering (connection refused at {url}), 0 s"]


def test_a_turn_waits_for_a_loading_container_when_told_to(make_pipeline: Any) -> None:
    with NimServer(ready_after=0.8) as server:
        pipeline = make_pipeline(
            routes=[route("local", server)],
            stages={"nim_health": {**FAST, "wait_for_ready": 20, "progress_every": 0.25}},
        )
        lines: list[str] = []
        stage(pipeline).progress = lines.append
        started = time.monotonic()
        result = asyncio.run(pipeline.arun(Turn.create("hello", timeout=30)))
        waited = time.monotonic() - started
    assert result.ok and result.text == "NIM reply to: hello"
    assert lines and lines[0].startswith(f"waiting for NIM at {server.base_url}: ")
    assert any("loading model" in line for line in lines)
    assert waited < 10


def test_a_turn_that_waited_too_long_fails_clearly(make_pipeline: Any) -> None:
    with NimServer() as server:
        server.set_ready(False)
        pipeline = make_pipeline(
            routes=[route("local", server)],
            stages={"nim_health": {**FAST, "wait_for_ready": 0.3}},
        )
        stage(pipeline).progress = None
        # A typed provider error raised by a stage reaches the caller as itself.
        with pytest.raises(UnavailableError) as info:
            pipeline.run(Turn.create("hello", timeout=30))
        assert server.count(CHAT) == 0
    assert info.value.route is not None and info.value.route.name == "local"
    assert "is not ready after waiting 0.3 s (wait_for_ready): still loading its model" in str(
        info.value
    )


def test_without_waiting_a_loading_only_route_gets_the_servers_own_error(
    make_pipeline: Any,
) -> None:
    with NimServer() as server:
        server.set_ready(False)
        pipeline = make_pipeline(routes=[route("local", server)], stages={"nim_health": FAST})
        wait_for(
            lambda: stage(pipeline).registry.snapshot(server.base_url).state is HealthState.LOADING,
            "loading",
        )
        with pytest.raises(UnavailableError, match="HTTP 503: The model is loading"):
            pipeline.run(Turn.create("hello", timeout=30))


def test_configure_returns_at_once_even_when_nothing_answers(make_pipeline: Any) -> None:
    started = time.monotonic()
    pipeline = make_pipeline(
        routes=[Route(name="dead", base_url=closed_port_url(), model=MODEL)],
        stages={"nim_health": {**FAST, "timeout": 5}},
    )
    assert time.monotonic() - started < 1.0
    wait_for(
        lambda: (
            stage(pipeline).registry.snapshot(pipeline.config.route("dead")).state
            is HealthState.DOWN
        ),
        "down",
    )
    pipeline.close()
    monitor = stage(pipeline).monitor
    assert monitor is not None and monitor._scheduler is None and monitor._prober is None


# --------------------------------------------------------------------------
# ``nimpipe status``
# --------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "nimpipe.toml"
    path.write_text(text)
    return str(path)


def test_nimpipe_status_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = closed_port_url()
    with NimServer(waiting_override=2, kv_cache_override=0.4, max_model_len=65536) as server:
        config = write_config(
            tmp_path,
            f"""
[routes.local]
base_url = "{server.base_url}"
model = "{MODEL}"

[routes.gone]
base_url = "{dead}"
model = "{MODEL}"

[stages.nim_health]
timeout = 1
""",
        )
        assert cli_main(["--config", config, "status"]) == 1
        out = capsys.readouterr().out
        assert cli_main(["--config", config, "status", "--json"]) == 1
        rows = json.loads(capsys.readouterr().out)
    header = out.splitlines()[0].split()
    assert header == [
        "endpoint",
        "health",
        "latency",
        "models",
        "context",
        "queue",
        "running",
        "kv-cache",
        "tok/s",
    ]
    local = line_of(out, server.base_url).split()
    assert local[1] == "ready" and local[4] == MODEL and local[5] == "65536"
    assert local[6:9] == ["2", "0", "40%"]
    assert line_of(out, dead).split()[1] == "down"
    assert f"connection refused at {dead}" in out
    by_url = {row["endpoint"]: row for row in rows}
    assert by_url[server.base_url]["waiting"] == 2 and by_url[server.base_url]["kv_cache"] == 0.4
    assert by_url[server.base_url]["routes"] == ["local"]
    assert by_url[dead]["state"] == "down" and by_url[dead]["last_error"]


def test_nimpipe_status_watch_gives_tokens_per_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with NimServer() as server:
        config = Config.from_dict(
            {"routes": {"local": {"base_url": server.base_url, "model": MODEL}}}, env={}
        )
        args = argparse.Namespace(watch=True, interval=0.1, json=True)
        assert run_status_command(config, args, samples=2) == 0
    samples = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(samples) == 2
    assert samples[0]["endpoints"][0]["tokens_per_s"] is None
    assert samples[1]["endpoints"][0]["tokens_per_s"] == 0.0


def test_nimpipe_status_without_routes(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(watch=False, interval=1.0, json=False)
    assert run_status_command(Config.from_dict({}, env={}), args) == 2
    assert "no endpoint is configured" in capsys.readouterr().err
