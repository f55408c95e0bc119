"""The budget stage: reserve before a call, reconcile after; limits hold under concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimpipe import Attempt, Block, CallRecord, Price, Route, Turn, hookimpl
from nimpipe.errors import ConfigError, HookError
from nimpipe.testing.nim_server import NimServer
from nimpipe_contrib.budget import BudgetStage
from nimpipe_contrib.ledger import Ledger

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
        )[0]
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
    with pytest.raises(HookError) as info:
        make_pipeline(stages={"budget": settings})
    cause = info.value.__cause__
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
        usd, capped = stage._estimate(turn, route)
        assert capped and usd is not None
        reserved[estimate] = usd
        result = pipeline.run(turn)
        assert result.ok and result.cost_usd <= usd
    assert reserved["tokenizer"] < reserved["bound"] / 3
