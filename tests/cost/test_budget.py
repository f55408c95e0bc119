"""The budget stage: reserve before a call, reconcile after; limits hold under concurrency."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from nimpipe import Attempt, Block, CallRecord, Price, Route, Turn, hookimpl
from nimpipe.errors import ConfigError, MalformedReplyError
from nimpipe.testing.nim_server import NimServer
from nimpipe_contrib.cost.budget import UNCAPPED_COMPLETION_TOKENS, BudgetStage
from nimpipe_contrib.cost.ledger import Ledger

CHEAP = "meta/llama-3.1-8b-instruct"
HOSTED = "meta/llama-3.1-70b-instruct"
MYSTERY = "acme/mystery-model"
#: 0.01 USD per 1k tokens both ways: a call of ~20 tokens costs ~$0.0002.
PRICE = Price(input_per_1k=0.01, output_per_1k=0.01, source="test")


@pytest.fixture(scope="module")
def server() -> Iterator[NimServer]:
    with NimServer(models=[CHEAP, HOSTED, MYSTERY], latency=0.05) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: NimServer) -> None:
    server.reset()


def hosted(server: NimServer, **kw: Any) -> Route:
    kw.setdefault("price", PRICE)
    kw.setdefault("tier", 1)
    return Route(name="hosted", base_url=server.base_url, model=HOSTED, **kw)


def local(server: NimServer) -> Route:
    return Route(name="local", base_url=server.base_url, model=CHEAP, self_hosted=True, tier=0)


def budget_of(pipeline: Any) -> BudgetStage:
    stage = pipeline.plugins.pm.get_plugin("budget")
    assert isinstance(stage, BudgetStage)
    return stage


def ledger_of(pipeline: Any) -> Ledger:
    ledger = pipeline.plugins.pm.get_plugin("ledger").ledger
    assert isinstance(ledger, Ledger)
    return ledger


def daily(stage: BudgetStage) -> Any:
    return next(s for s in stage.status() if s.rule == "budget:daily")


# ----------------------------------------------------------------------
# concurrency: the limit holds
# ----------------------------------------------------------------------


def test_64_concurrent_turns_never_overrun_the_budget(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    limit = 0.01
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={
            "budget": {"daily_usd": limit, "on_limit": "refuse", "default_completion_tokens": 16},
            "ledger": {"path": str(tmp_path / "l.sqlite")},
        },
    )

    async def wave(n: int) -> list[Any]:
        turns = [
            Turn.create(f"wave {n} turn {i} asks a short question", agent_id=f"agent-{i % 4}")
            for i in range(64)
        ]
        return list(await asyncio.gather(*(pipeline.arun(t) for t in turns)))

    async def main() -> list[Any]:
        results: list[Any] = []
        for n in range(30):  # waves of 64 until one gets no answer: the budget is used up
            batch = await wave(n)
            results += batch
            if all(r.blocked for r in batch):
                break
        return results

    results = asyncio.run(main())
    stage = budget_of(pipeline)
    spend = sum(r.cost_usd for r in results)
    answered = [r for r in results if r.blocked is None]
    blocked = [r for r in results if r.blocked is not None]
    assert answered and blocked
    assert {r.blocked.rule for r in blocked} == {"budget:daily"}
    assert blocked[0].text.startswith("The daily model budget ($0.01) is used up")
    assert spend <= limit
    assert stage.reservations == 0 and stage.overruns == 0
    status = daily(stage)
    assert status.spent_usd == pytest.approx(spend) and status.reserved_usd == 0
    ledger_spend, _ = ledger_of(pipeline).spend(0)
    assert ledger_spend == pytest.approx(spend, abs=1e-9)
    # every request carried the completion cap the reservation assumed
    assert {r.body["max_tokens"] for r in server.requests} == {16}
    waves = len(results) // 64
    # used up: what is left is less than one more call's reservation
    assert (
        limit - spend
        < stage._estimate(
            Turn.create("wave 99 turn 99 asks a short question"), pipeline.config.routes["hosted"]
        ).usd
    )
    print(
        f"\n64 concurrent turns x {waves} waves: spend/limit = ${spend:.6f}/${limit:.2f} "
        f"({spend / limit:.0%}); {len(answered)} answered, {len(blocked)} refused"
    )


def test_downgrade_at_the_limit_keeps_answering(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    limit = 0.002
    pipeline = make_pipeline(
        routes=[hosted(server), local(server)],
        default_route="hosted",
        stages={
            "budget": {"daily_usd": limit, "default_completion_tokens": 16},
            "ledger": {"path": str(tmp_path / "l.sqlite")},
        },
    )

    async def main() -> list[Any]:
        turns = [Turn.create(f"turn {i} asks a short question") for i in range(64)]
        return list(await asyncio.gather(*(pipeline.arun(t) for t in turns)))

    results = asyncio.run(main())
    assert all(r.ok for r in results)
    routes = [r.route.name for r in results]
    assert "hosted" in routes and "local" in routes
    spend = sum(r.cost_usd for r in results)
    assert spend <= limit
    rows = ledger_of(pipeline).rows()
    downgraded = [r for r in rows if r["route"] == "local"]
    assert downgraded and all(
        "budget: over the limit on hosted" in r["routing_reason"] for r in downgraded
    )
    print(f"\ndowngrade: spend/limit = ${spend:.6f}/${limit:.3f}, {routes.count('local')} on local")


def test_threads_share_one_budget(server: NimServer, make_pipeline: Any) -> None:
    limit = 0.003
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={"budget": {"daily_usd": limit, "on_limit": "refuse", "cap_completion": True}},
    )
    results: list[Any] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(8):
            result = pipeline.run(Turn.create(f"thread {n} call {i}", params={"max_tokens": 16}))
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 64
    assert sum(r.cost_usd for r in results) <= limit
    assert any(r.blocked for r in results) and budget_of(pipeline).reservations == 0


# ----------------------------------------------------------------------
# reservations follow every call to its record
# ----------------------------------------------------------------------


def test_a_failed_call_releases_its_reservation(server: NimServer, make_pipeline: Any) -> None:
    pipeline = make_pipeline(
        routes=[hosted(server, max_retries=0)], stages={"budget": {"daily_usd": 1.0}}
    )
    server.inject("status", status=500)
    with pytest.raises(Exception, match="500"):
        pipeline.run(Turn.create("this fails"))
    stage = budget_of(pipeline)
    assert stage.reservations == 0
    assert daily(stage).reserved_usd == 0 and daily(stage).spent_usd == 0


class ReservationProbe:
    """Looks at the budget's reservations after each record (budget runs first)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.stage: BudgetStage | None = None

    @hookimpl(trylast=True)
    def record_cost(self, record: CallRecord) -> None:
        assert self.stage is not None
        self.seen.append((record.outcome, self.stage.reservations))


def test_a_transport_retry_keeps_the_reservation_until_the_call_ends(
    server: NimServer, make_pipeline: Any
) -> None:
    probe = ReservationProbe()
    pipeline = make_pipeline(
        routes=[hosted(server, max_retries=1)],
        plugins=[("probe", probe)],
        stages={"budget": {"daily_usd": 1.0}},
    )
    probe.stage = budget_of(pipeline)
    server.inject("status", status=503)
    result = pipeline.run(Turn.create("retried once"))
    assert result.ok
    assert probe.seen == [("retried", 1), ("ok", 0)]
    assert daily(probe.stage).spent_usd == pytest.approx(result.cost_usd)


class Policy:
    """A ``before_call`` policy that refuses calls for agents named ``banned``."""

    @hookimpl
    def before_call(self, turn: Turn, route: Route, attempt: Attempt) -> Block | None:
        if turn.agent_id == "banned":
            return Block(reason="agent banned", rule="policy:banned")
        return None


def test_a_block_before_the_budget_reserves_nothing(server: NimServer, make_pipeline: Any) -> None:
    pipeline = make_pipeline(
        routes=[hosted(server)],
        plugins=[("policy", Policy())],
        stages={"budget": {"daily_usd": 1.0}},
    )
    result = pipeline.run(Turn.create("hello", agent_id="banned"))
    assert result.blocked is not None and result.blocked.rule == "policy:banned"
    assert budget_of(pipeline).reservations == 0 and server.count() == 0


# ----------------------------------------------------------------------
# limits per agent and month, unpriced routes, escalations, seeding
# ----------------------------------------------------------------------


def test_agent_limits(server: NimServer, make_pipeline: Any) -> None:
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={
            "budget": {
                "agent_daily_usd": 0.0005,
                "on_limit": "refuse",
                "default_completion_tokens": 16,
                "agents": {"orchestrator": {"daily_usd": 1.0}},
            }
        },
    )
    turns = [
        Turn.create(f"sub call {i}", agent_id="sub-1", agent_type="explorer") for i in range(4)
    ]
    results = [pipeline.run(t) for t in turns]
    assert results[0].ok and results[-1].blocked is not None
    assert results[-1].blocked.rule == "budget:agent-daily"
    assert "agent 'sub-1'" in results[-1].blocked.message
    assert pipeline.run(Turn.create("other agent", agent_id="sub-2")).ok
    for i in range(4):
        assert pipeline.run(Turn.create(f"orchestrate {i}", agent_id="orchestrator")).ok


def test_monthly_limit(server: NimServer, make_pipeline: Any) -> None:
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={"budget": {"daily_usd": 10.0, "monthly_usd": 0.0001, "on_limit": "refuse"}},
    )
    result = pipeline.run(Turn.create("over the monthly limit"))
    assert result.blocked is not None and result.blocked.rule == "budget:monthly"
    assert "try again next month" in result.text


def test_unpriced_routes(server: NimServer, make_pipeline: Any) -> None:
    unpriced = Route(name="mystery", base_url=server.base_url, model=MYSTERY, self_hosted=False)
    pipeline = make_pipeline(
        routes=[unpriced], stages={"budget": {"daily_usd": 1.0, "on_limit": "refuse"}}
    )
    result = pipeline.run(Turn.create("how much?"))
    assert result.blocked is not None and result.blocked.rule == "budget:unpriced"
    allowing = make_pipeline(
        routes=[unpriced], stages={"budget": {"daily_usd": 1.0, "unpriced": "allow"}}
    )
    assert allowing.run(Turn.create("how much?")).ok


def test_an_unaffordable_escalation_keeps_the_answer_in_hand(
    server: NimServer, make_pipeline: Any
) -> None:
    server.configure(replies={"explain": "I'm sorry, but I can't help with that."})
    pipeline = make_pipeline(
        routes=[local(server), hosted(server)],
        stages={"budget": {"daily_usd": 0.00001, "on_limit": "refuse"}, "cascade": {}},
    )
    result = pipeline.run(Turn.create("explain the budget"))
    assert result.ok and result.route is not None and result.route.name == "local"
    assert "no route left to escalate to" in [d.reason for d in result.decisions]
    assert [r.route for r in result.records] == ["local"]


def test_spend_already_in_the_ledger_counts(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    db = tmp_path / "l.sqlite"
    earlier = Ledger.open(db)
    earlier.record(
        CallRecord(
            time=time.time(),
            turn_id="earlier",
            agent_id="main",
            agent_type="main",
            route="hosted",
            provider="x",
            model=HOSTED,
            cost_usd=0.99,
        )
    )
    earlier.close()
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={
            "budget": {"daily_usd": 1.0, "on_limit": "refuse"},
            "ledger": {"path": str(db)},
        },
    )
    result = pipeline.run(
        Turn.create("one more with a long enough prompt", params={"max_tokens": 999})
    )
    assert result.blocked is not None and "$0.990000 spent" in result.blocked.reason


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"on_limit": "maybe"}, "stages.budget.on_limit"),
        ({"daily_usd": -1}, "stages.budget.daily_usd"),
        ({"weekly_usd": 1}, "stages.budget.weekly_usd"),
        ({"agents": {"x": {"weekly_usd": 1}}}, "stages.budget.agents.x.weekly_usd"),
        ({"timezone": "Mars/Olympus"}, "stages.budget.timezone"),
    ],
)
def test_bad_settings_name_the_key(make_pipeline: Any, settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_pipeline(stages={"budget": settings})
    cause = info.value
    assert isinstance(cause, ConfigError) and cause.key == key


def test_tokenizer_estimates_reserve_less_than_the_byte_bound(
    server: NimServer, make_pipeline: Any
) -> None:
    turn = Turn.create("a prompt of several ordinary English words " * 20, params={"max_tokens": 8})
    reserved = {}
    for estimate in ("bound", "tokenizer"):
        pipeline = make_pipeline(
            routes=[hosted(server)],
            stages={"budget": {"daily_usd": 1.0, "prompt_estimate": estimate}},
        )
        stage = budget_of(pipeline)
        route = pipeline.config.routes["hosted"]
        cost = stage._estimate(turn, route)
        usd = cost.usd
        assert cost.capped_route is None and usd is not None  # the request carries its cap
        reserved[estimate] = usd
        result = pipeline.run(turn)
        assert result.ok and result.cost_usd <= usd
    assert reserved["tokenizer"] < reserved["bound"] / 3


# ----------------------------------------------------------------------
# hostile servers and records: the limit holds against any reply
# ----------------------------------------------------------------------


def lying_reply(model: str, prompt: Any = 5, completion: Any = 5000) -> dict[str, Any]:
    """A NIM-shaped completion whose usage says what a hostile server wants."""
    return {
        "id": "chatcmpl-lie",
        "object": "chat.completion",
        "created": 1_750_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "a short answer"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }


def run_turns(pipeline: Any, mode: str, turns: list[Turn]) -> list[Any]:
    """Each turn's result, or the exception it raised; ``arun`` runs them all at once."""
    if mode == "run":
        out: list[Any] = []
        for turn in turns:
            try:
                out.append(pipeline.run(turn))
            except Exception as exc:
                out.append(exc)
        return out

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(*(pipeline.arun(t) for t in turns), return_exceptions=True)
        )

    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_server_ignoring_the_completion_cap_cannot_overspend(
    server: NimServer, make_pipeline: Any, tmp_path: Path, mode: str
) -> None:
    limit = 0.01
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={
            "budget": {"daily_usd": limit, "on_limit": "refuse", "default_completion_tokens": 16},
            "ledger": {"path": str(tmp_path / "l.sqlite")},
        },
    )
    # every reply claims 5,000 completion tokens ($0.05, five times the day's limit)
    server.inject("status", count=None, status=200, body=lying_reply(HOSTED))
    turns = [Turn.create(f"{mode} turn {i} asks a short question") for i in range(60)]
    results = run_turns(pipeline, mode, turns)
    assert not [r for r in results if isinstance(r, BaseException)]
    answered = [r for r in results if r.ok]
    blocked = [r for r in results if not r.ok]
    assert answered and blocked and {r.blocked.rule for r in blocked} == {"budget:daily"}
    records = [rec for r in answered for rec in r.records]
    assert records and all(rec.completion_tokens <= 16 for rec in records)
    spend = sum(r.cost_usd for r in results)
    stage = budget_of(pipeline)
    status = daily(stage)
    assert spend <= limit and status.spent_usd <= limit
    assert status.spent_usd == pytest.approx(spend)
    assert status.overshoot_usd == 0 and stage.overruns == 0 and stage.reservations == 0
    ledger_spend, _ = ledger_of(pipeline).spend(0)
    assert ledger_spend == pytest.approx(spend, abs=1e-9)
    print(
        f"\ncap ignored ({mode}): spend/limit = ${spend:.6f}/${limit:.2f}, overshoot "
        f"${status.overshoot_usd:.6f}; {len(answered)} answered, {len(blocked)} refused"
    )


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_negative_usage_creates_no_headroom(
    server: NimServer, make_pipeline: Any, mode: str
) -> None:
    limit = 0.01
    pipeline = make_pipeline(
        routes=[hosted(server, max_retries=0)],
        stages={
            "budget": {"daily_usd": limit, "on_limit": "refuse", "default_completion_tokens": 16}
        },
    )
    stage = budget_of(pipeline)
    assert pipeline.run(Turn.create("an honest call first")).ok
    before = daily(stage).spent_usd
    assert before > 0
    server.inject(
        "status", count=None, status=200, body=lying_reply(HOSTED, prompt=-1_000_000, completion=3)
    )
    results = run_turns(pipeline, mode, [Turn.create(f"{mode} {i} lies") for i in range(8)])
    # the reply is a typed error, and what it cost is never below zero
    assert all(isinstance(r, MalformedReplyError) for r in results), results
    after = daily(stage)
    assert before <= after.spent_usd <= limit and after.overshoot_usd == 0
    assert stage.reservations == 0 and after.reserved_usd == 0
    server.clear_faults()
    assert pipeline.run(Turn.create("an honest call after")).ok
    print(f"\nnegative usage ({mode}): spend/limit = ${daily(stage).spent_usd:.6f}/${limit:.2f}")


def reserve(pipeline: Any, turn: Turn) -> Any:
    """Ask the budget (through the hook relay) to reserve the first call of ``turn``."""
    route = pipeline.config.routes["hosted"]
    return budget_of(pipeline).before_call(
        turn=turn, route=route, attempt=Attempt(), pipeline=pipeline
    )


def record_of(turn: Turn, **kw: Any) -> CallRecord:
    values: dict[str, Any] = {
        "time": time.time(),
        "turn_id": turn.id,
        "agent_id": turn.agent_id,
        "agent_type": turn.agent_type,
        "route": "hosted",
        "provider": "third-party",
        "model": HOSTED,
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "cost_usd": 0.0002,
    }
    values.update(kw)
    return CallRecord(**values)


@pytest.mark.parametrize(
    "figures",
    [
        {"cost_usd": math.nan},
        {"cost_usd": math.inf},
        {"cost_usd": -5.0},
        {"prompt_tokens": -1_000_000, "cost_usd": -9.99},
        {"prompt_tokens": -1_000_000, "completion_tokens": 20, "cost_usd": 0.0},
        {"completion_tokens": 10**20, "cost_usd": 1e18},
        {"completion_tokens": 12.5},
        {"prompt_tokens": True},
        {"cost_usd": 1e300},
    ],
)
def test_a_record_with_impossible_figures_is_charged_its_reservation(
    server: NimServer, make_pipeline: Any, figures: dict[str, Any]
) -> None:
    limit = 0.01
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={
            "budget": {"daily_usd": limit, "on_limit": "refuse", "default_completion_tokens": 16}
        },
    )
    stage = budget_of(pipeline)
    turn = Turn.create("a third-party provider answers this")
    assert reserve(pipeline, turn) is not None  # the capped route
    reserved = daily(stage).reserved_usd
    assert reserved > 0
    record = record_of(turn, **figures)
    pipeline.plugins.pm.hook.record_cost(record=record, turn=turn, pipeline=pipeline)
    status = daily(stage)
    assert status.spent_usd == pytest.approx(reserved) and status.reserved_usd == 0
    assert math.isfinite(status.spent_usd) and status.overshoot_usd == 0
    assert stage.invalid_records == 1 and stage.overruns == 0


def test_a_record_with_impossible_figures_and_no_reservation_is_charged_its_worst_case(
    server: NimServer, make_pipeline: Any
) -> None:
    pipeline = make_pipeline(
        routes=[hosted(server, context_length=1000)],
        stages={"budget": {"daily_usd": 1.0}},
    )
    stage = budget_of(pipeline)
    turn = Turn.create("never reserved")
    record = record_of(turn, prompt_tokens=-5, completion_tokens=10**20, cost_usd=math.nan)
    pipeline.plugins.pm.hook.record_cost(record=record, turn=turn, pipeline=pipeline)
    # each impossible count is taken as the whole context: 1000 + 1000 tokens at $0.01/1k
    assert daily(stage).spent_usd == pytest.approx(PRICE.cost(1000, 1000))
    assert stage.invalid_records == 1


def test_a_call_costing_more_than_its_reservation_is_charged_and_stops_the_next(
    server: NimServer, make_pipeline: Any, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 0.01
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={
            "budget": {"daily_usd": limit, "on_limit": "refuse", "default_completion_tokens": 16}
        },
    )
    stage = budget_of(pipeline)
    turn = Turn.create("a provider that does not clamp its usage")
    reserve(pipeline, turn)
    # a third-party provider reports 5,000 completion tokens against a cap of 16
    record = record_of(turn, completion_tokens=5000, cost_usd=PRICE.cost(10, 5000))
    with caplog.at_level(logging.WARNING, logger="nimpipe.budget"):
        pipeline.plugins.pm.hook.record_cost(record=record, turn=turn, pipeline=pipeline)
    status = daily(stage)
    # the spend is real: charged in full, reported, and nothing more is let through
    assert status.spent_usd == pytest.approx(record.cost_usd)
    assert status.overshoot_usd == pytest.approx(record.cost_usd - limit)
    assert stage.overruns == 1 and stage.reservations == 0
    assert "budget:daily limit of $0.010000 overshot by $0.040100" in caplog.text
    refused = reserve(pipeline, Turn.create("the next call"))
    assert isinstance(refused, Block) and refused.rule == "budget:daily"
    result = pipeline.run(Turn.create("and through the pipeline"))
    assert result.blocked is not None and result.blocked.rule == "budget:daily"
    assert server.count() == 0


def test_uncapped_calls_reserve_the_whole_context(server: NimServer, make_pipeline: Any) -> None:
    from nimpipe_contrib.cost.prices import prompt_token_bound

    pipeline = make_pipeline(
        routes=[hosted(server, context_length=4096)],
        stages={"budget": {"daily_usd": 1.0, "cap_completion": False}},
    )
    stage = budget_of(pipeline)
    route = pipeline.config.routes["hosted"]
    turn = Turn.create("no cap at all")
    bound = prompt_token_bound(turn)
    cost = stage._estimate(turn, route)
    assert cost.capped_route is None and cost.usd == pytest.approx(PRICE.cost(bound, 4096))
    unknown = attrs.evolve(route, context_length=None)
    assert stage._estimate(turn, unknown).usd == pytest.approx(
        PRICE.cost(bound, UNCAPPED_COMPLETION_TOKENS)
    )
    # with cap_completion on, a cap field the server may read any way is no cap either
    capping = make_pipeline(routes=[hosted(server, context_length=4096)], stages={"budget": {}})
    odd = Turn.create("no cap at all", params={"max_tokens": "lots"})
    odd_cost = budget_of(capping)._estimate(odd, capping.config.routes["hosted"])
    assert odd_cost.capped_route is None and odd_cost.usd == pytest.approx(PRICE.cost(bound, 4096))
    # a cap from extra_body counts, and the larger of two caps
    both = attrs.evolve(route, extra_body={"max_completion_tokens": 300}, max_output_tokens=20)
    assert stage._estimate(turn, both).usd == pytest.approx(PRICE.cost(bound, 300))


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_lying_server_on_an_uncapped_route_overshoots_by_one_call_at_most(
    server: NimServer, make_pipeline: Any, mode: str
) -> None:
    from nimpipe_contrib.cost.prices import prompt_token_bound

    context = 1000
    turns = [Turn.create(f"{mode} uncapped {i}") for i in range(6)]
    one_call = max(PRICE.cost(prompt_token_bound(t), context) for t in turns)
    limit = round(one_call * 1.5, 6)  # room for one worst-case call, not two
    pipeline = make_pipeline(
        routes=[hosted(server, context_length=context)],
        stages={"budget": {"daily_usd": limit, "on_limit": "refuse", "cap_completion": False}},
    )
    # the request has no cap to clamp to: the server's 5,000 tokens reach the record
    server.inject("status", count=None, status=200, body=lying_reply(HOSTED, completion=5000))
    results = run_turns(pipeline, mode, turns)
    answered = [r for r in results if not isinstance(r, BaseException) and r.ok]
    assert len(answered) == 1
    assert all(r.blocked.rule == "budget:daily" for r in results if r not in answered)
    stage = budget_of(pipeline)
    status = daily(stage)
    assert status.spent_usd == pytest.approx(answered[0].cost_usd)
    assert 0 < status.overshoot_usd <= answered[0].cost_usd and stage.overruns == 1
    print(
        f"\nuncapped lying server ({mode}): spend/limit = ${status.spent_usd:.6f}/${limit:.6f}, "
        f"overshoot ${status.overshoot_usd:.6f} (one call), {len(results) - 1} refused"
    )


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5])
def test_a_route_price_that_is_not_a_finite_amount_is_refused(
    server: NimServer, make_pipeline: Any, value: float
) -> None:
    bad = Price(input_per_1k=0.01, output_per_1k=value, source="test")
    with pytest.raises(ConfigError) as info:
        make_pipeline(routes=[hosted(server, price=bad)], stages={"budget": {"daily_usd": 1.0}})
    cause = info.value
    assert isinstance(cause, ConfigError) and cause.key == "routes.hosted.price.output_per_1k"
    # a route added after configure (endpoint discovery) is refused at its call
    pipeline = make_pipeline(
        routes=[hosted(server)],
        stages={"budget": {"daily_usd": 1.0, "unpriced": "allow", "on_limit": "refuse"}},
    )
    pipeline.replace_routes(hosted(server, price=bad))
    result = pipeline.run(Turn.create("priced at nan"))
    assert result.blocked is not None and result.blocked.rule == "budget:invalid-price"
    assert "output_per_1k is" in result.blocked.reason and server.count() == 0


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"daily_usd": math.nan}, "stages.budget.daily_usd"),
        ({"daily_usd": math.inf}, "stages.budget.daily_usd"),
        ({"monthly_usd": -0.01}, "stages.budget.monthly_usd"),
        ({"monthly_usd": math.inf}, "stages.budget.monthly_usd"),
        ({"agent_daily_usd": math.nan}, "stages.budget.agent_daily_usd"),
        ({"agent_monthly_usd": -math.inf}, "stages.budget.agent_monthly_usd"),
        ({"agents": {"x": {"daily_usd": math.nan}}}, "stages.budget.agents.x.daily_usd"),
        ({"agents": {"x": {"monthly_usd": math.inf}}}, "stages.budget.agents.x.monthly_usd"),
        ({"prompt_margin": math.inf}, "stages.budget.prompt_margin"),
        ({"reservation_ttl": math.nan}, "stages.budget.reservation_ttl"),
        ({"default_completion_tokens": 10**12}, "stages.budget.default_completion_tokens"),
    ],
)
def test_limits_that_are_not_finite_amounts_name_the_key(
    make_pipeline: Any, settings: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_pipeline(stages={"budget": settings})
    cause = info.value
    assert isinstance(cause, ConfigError) and cause.key == key
