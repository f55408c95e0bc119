"""Fan-out: many turns with bounded concurrency, per-turn errors, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from nimpipe import CallRecord, CancelToken, Route, Turn, hookimpl
from nimpipe.errors import HookError, NimpipeError, UnavailableError

MODEL = "meta/llama-3.1-8b-instruct"


class Ledger:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.lock = threading.Lock()

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        with self.lock:
            self.records.append(record)


def test_amap_bounds_concurrency_and_keeps_order(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(latency=0.05)
    ledger = Ledger()
    pipeline = make_pipeline(
        routes=[Route(name="r", base_url=nim_server.base_url, model=MODEL)], plugins=[ledger]
    )
    turns = [
        Turn.create(f"job {i}", agent_id=f"sub-{i % 4}", agent_type="worker") for i in range(40)
    ]
    peak = 0

    def watch(done: int, total: int) -> None:
        nonlocal peak
        peak = max(peak, nim_server.in_flight)

    results = asyncio.run(pipeline.amap(turns, concurrency=8, progress=watch))
    assert [r.text for r in results] == [f"NIM reply to: job {i}" for i in range(40)]
    assert 1 <= peak <= 8
    per_agent: dict[str, int] = {}
    for record in ledger.records:
        per_agent[record.agent_id] = per_agent.get(record.agent_id, 0) + 1
    assert per_agent == {f"sub-{n}": 10 for n in range(4)}


def test_failed_turns_do_not_sink_the_batch(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(
        routes=[Route(name="r", base_url=nim_server.base_url, model=MODEL, max_retries=0)]
    )
    nim_server.inject("status", count=3, status=503)
    results = pipeline.map([Turn.create(f"j{i}") for i in range(10)], concurrency=1)
    errors = [r for r in results if isinstance(r, NimpipeError)]
    assert len(errors) == 3 and all(isinstance(e, UnavailableError) for e in errors)
    assert sum(1 for r in results if not isinstance(r, NimpipeError)) == 7


def test_throttle_delays_starts(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[Route(name="r", base_url=nim_server.base_url, model=MODEL)])
    calls = []

    def throttle() -> float:
        calls.append(1)
        return 0.0

    pipeline.map([Turn.create("x")] * 5, concurrency=2, throttle=throttle)
    assert len(calls) == 5


def test_cancel_stops_the_batch(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(latency=0.5)
    pipeline = make_pipeline(routes=[Route(name="r", base_url=nim_server.base_url, model=MODEL)])
    token = CancelToken()

    async def main() -> list[Any]:
        asyncio.get_running_loop().call_later(0.2, token.cancel)
        return await pipeline.amap(
            [Turn.create(f"x{i}") for i in range(20)], concurrency=4, cancel=token
        )

    results = asyncio.run(main())
    assert all(isinstance(r, NimpipeError) for r in results)


def test_bad_concurrency(make_pipeline: Any) -> None:
    pipeline = make_pipeline()
    with pytest.raises(ValueError, match="at least 1"):
        pipeline.map([], concurrency=0)


def test_fanout_backs_off_while_the_server_queues(
    nim_server: Any, make_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nim_health running, amap waits before each turn while num_requests_waiting is high."""
    import time

    fast = {"interval": 0.1, "loading_interval": 0.05, "timeout": 1.0, "overload_waiting": 4}
    route = Route(name="r", base_url=nim_server.base_url, model=MODEL, self_hosted=True)
    pipeline = make_pipeline(routes=[route], stages={"nim_health": fast})
    health = pipeline.plugins.pm.get_plugin("nim_health")
    nim_server.configure(waiting_override=10)
    for _ in range(100):  # bounded wait for a probe to see the queue
        if health.registry.snapshot(route).waiting == 10:
            break
        time.sleep(0.05)
    assert health.backpressure(route) == pytest.approx(0.5)

    from nimpipe_contrib.nim.health import NimHealth

    seen: list[float] = []
    real = NimHealth.backpressure

    def spy(self: NimHealth, route: Any = None) -> float:
        seen.append(real(self, route))
        return seen[-1]

    monkeypatch.setattr(NimHealth, "backpressure", spy)
    results = pipeline.map([Turn.create(f"q{i}") for i in range(3)], concurrency=3)
    assert all(not isinstance(r, NimpipeError) for r in results)
    assert seen == [pytest.approx(0.5)] * 3, "every turn of the batch consulted the queue depth"

    nim_server.configure(waiting_override=0)
    for _ in range(100):
        if health.registry.snapshot(route).waiting == 0:
            break
        time.sleep(0.05)
    seen.clear()
    pipeline.map([Turn.create("q")], concurrency=1)
    assert seen == [0.0]


class Delay:
    """A third-party stage that slows every fan-out turn by ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.asked: dict[str, float] = {}
        self.started: dict[str, float] = {}

    @hookimpl
    def fanout_delay(self, turn: Turn) -> float:
        self.asked[turn.id] = time.monotonic()
        return self.seconds

    @hookimpl
    def pre_input(self, turn: Turn) -> None:
        self.started.setdefault(turn.id, time.monotonic())


class Fixed:
    def __init__(self, value: Any) -> None:
        self.value = value

    @hookimpl
    def fanout_delay(self) -> Any:
        return self.value


def test_a_stage_s_fanout_delay_holds_each_turn_back(nim_server: Any, make_pipeline: Any) -> None:
    delay = Delay(0.2)
    pipeline = make_pipeline(
        routes=[Route(name="r", base_url=nim_server.base_url, model=MODEL)], plugins=[delay]
    )
    turns = [Turn.create(f"d{i}") for i in range(4)]
    results = asyncio.run(pipeline.amap(turns, concurrency=2))
    assert all(not isinstance(r, NimpipeError) for r in results)
    assert set(delay.asked) == set(delay.started) == {t.id for t in turns}
    for turn in turns:  # each turn started no earlier than the delay after it was asked
        assert delay.started[turn.id] - delay.asked[turn.id] >= 0.2 - 0.01
    # map (the blocking form) asks too.
    delay.asked.clear()
    pipeline.map([Turn.create("m")], concurrency=1)
    assert len(delay.asked) == 1


def test_an_explicit_throttle_replaces_the_fanout_delay_hook(
    nim_server: Any, make_pipeline: Any
) -> None:
    delay = Delay(5.0)
    pipeline = make_pipeline(
        routes=[Route(name="r", base_url=nim_server.base_url, model=MODEL)], plugins=[delay]
    )
    turns = [Turn.create(f"t{i}") for i in range(3)]
    results = pipeline.map(turns, concurrency=3, throttle=lambda: 0.0)
    assert all(not isinstance(r, NimpipeError) for r in results)
    assert delay.asked == {} and len(delay.started) == 3


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((0.05, 0.3), 0.3),  # the largest wins
        ((0.3, 0.05), 0.3),
        ((float("nan"), 0.1), 0.1),  # NaN, negative and infinite count as 0
        ((-4.0, None), 0.0),
        ((float("inf"), 0), 0.0),
        ((float("-inf"), 2), 2.0),
        ((None, None), 0.0),
    ],
)
def test_fanout_delay_takes_the_largest_sane_value(
    make_pipeline: Any, values: tuple[Any, ...], expected: float
) -> None:
    plugins = [(f"delay{i}", Fixed(v)) for i, v in enumerate(values)]
    pipeline = make_pipeline(plugins=plugins)
    assert asyncio.run(pipeline._fanout_delay(Turn.create("x"))) == pytest.approx(expected)


def test_a_fanout_delay_that_is_not_a_number_fails_its_turn_not_the_batch(
    nim_server: Any, make_pipeline: Any
) -> None:
    bad = Fixed("soon")
    pipeline = make_pipeline(
        routes=[Route(name="r", base_url=nim_server.base_url, model=MODEL)],
        plugins=[("slowpoke", bad)],
    )
    results = pipeline.map([Turn.create(f"b{i}") for i in range(3)], concurrency=2)
    assert len(results) == 3
    for result in results:
        assert isinstance(result, HookError)
        assert result.plugin == "slowpoke" and result.hook == "fanout_delay"
        assert "str" in str(result) and "expected seconds" in str(result)
    assert nim_server.count("/v1/chat/completions") == 0
