"""One hostile reply never poisons the ledger, and budgets never trust a server blindly.

- ``prompt_tokens = 10**20`` (or ``1e999``, or negative) in one reply: the
  good records that follow still commit, no turn waits past its deadline for
  the ledger, and closing the pipeline does not hang.
- A record the database refuses (tokens beyond 64 bits, a cost of ``inf``)
  is set aside: the writer does not retry it forever, later records commit.
- A database that stays locked (another writer holds the lock) never holds a
  turn past its deadline, however full the queue; once it is free, every
  record commits.
- A server that ignores the completion cap and reports 5,000 completion
  tokens, or reports negative usage, cannot push spend over a small limit.
- A ``nan`` (or infinite, or negative) price or limit is refused when the
  configuration is read; a route built in code with one cannot disable the
  budget.
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hostile_harness import (
    GRACE,
    MODES,
    SLACK,
    Expect,
    Recorder,
    TurnOutcome,
    add_row,
    answer_is,
    any_stuck,
    check_case,
    fail_message,
    judge_turn,
    record_problems,
    run_turn,
    tail,
    watch,
)
from hostile_server import ANSWER, new_tag

from nimpipe import CallRecord, Price, Route, Turn, TurnResult
from nimpipe.config import Config
from nimpipe.errors import ConfigError
from nimpipe.pipeline import Pipeline
from nimpipe_contrib.cost.ledger import Ledger

DEADLINE = 3.0
MODEL = "hostile-model"
#: 0.1 USD per 1k tokens both ways: an honest call (10 + 5 tokens) costs $0.0015.
PRICE = Price(input_per_1k=0.1, output_per_1k=0.1, source="test")
LIMIT = 0.02


def _route(hostile: Any, name: str, scenario: str, **kw: Any) -> tuple[Route, str]:
    tag = new_tag()
    kw.setdefault("price", PRICE)
    kw.setdefault("max_retries", 0)
    return Route(name=name, base_url=hostile.base_url(scenario, tag), model=MODEL, **kw), tag


def answer_or_budget_block(result: TurnResult, outcome: TurnOutcome) -> list[str]:
    if result.blocked is not None:
        rule = result.blocked.rule or ""
        return [] if rule.startswith("budget") else [f"blocked by {rule!r}"]
    return answer_is(ANSWER)(result, outcome)


def _judge_all(outcomes: list[TurnOutcome], expect: Expect) -> list[str]:
    problems = []
    for i, outcome in enumerate(outcomes):
        problems += [f"turn {i}: {p}" for p in judge_turn(outcome, expect, DEADLINE + SLACK)]
    return problems


def _slowest(outcomes: list[TurnOutcome]) -> float | None:
    times = [o.elapsed for o in outcomes if o.elapsed is not None]
    return max(times) if times else None


# --------------------------------------------------------------------------
# the ledger
# --------------------------------------------------------------------------

GOOD_TURNS = 8
CLOSE_TIMEOUT = 2.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scenario", ["usage=huge", "usage=inf", "usage=negative"])
def test_one_reply_never_poisons_the_ledger(
    hostile: Any, make_pipeline: Any, tmp_path: Path, scenario: str, mode: str
) -> None:
    bad, _ = _route(hostile, "bad", scenario)
    good, _ = _route(hostile, "good", "ok")
    recorder = Recorder()
    # A small queue: a writer stuck on one record would block record_cost within a few turns.
    pipeline = make_pipeline(
        routes=[bad, good],
        plugins=[recorder],
        default_route="good",
        stages={
            "ledger": {
                "path": str(tmp_path / "ledger.sqlite"),
                "flush_interval": 0.05,
                "max_pending": 4,
                "close_timeout": CLOSE_TIMEOUT,
            }
        },
    )
    ledger = pipeline.plugins.pm.get_plugin("ledger").ledger
    outcomes: list[TurnOutcome] = []
    steps: dict[str, Any] = {}

    def flow() -> None:
        outcomes.append(TurnOutcome(mode))
        run_turn(
            pipeline,
            mode,
            lambda: Turn.create("poison", timeout=DEADLINE, route="bad"),
            outcome=outcomes[-1],
        )
        for i in range(GOOD_TURNS):
            outcomes.append(TurnOutcome(mode))
            run_turn(
                pipeline,
                mode,
                lambda: Turn.create(f"good {i}", timeout=DEADLINE, route="good"),  # noqa: B023
                outcome=outcomes[-1],
            )
        started = time.monotonic()
        steps["flushed"] = ledger.flush(timeout=3.0)
        steps["flush_s"] = time.monotonic() - started
        steps["rows"] = ledger.rows(flush=False)
        started = time.monotonic()
        pipeline.close()
        steps["close_s"] = time.monotonic() - started

    limit = (GOOD_TURNS + 1) * (DEADLINE + SLACK) + 3.0 + CLOSE_TIMEOUT + 6.0
    watched = watch(
        flow, limit, name=f"hostile-ledger-{mode}", stuck=any_stuck(outcomes, DEADLINE + SLACK)
    )
    problems = _judge_all(outcomes[:1], Expect(answer_is(ANSWER)))
    problems += _judge_all(outcomes[1:], Expect(answer_is(ANSWER)))
    problems += record_problems(recorder.records)
    if not watched.finished:
        problems.append(f"the flow was given up on, still running: {sorted(steps)} done")
    elif watched.error is not None:
        problems.append(f"{type(watched.error).__name__}: {watched.error}")
    else:
        if not steps["flushed"]:
            problems.append(f"flush() gave up after {steps['flush_s']:.1f} s: records stuck")
        good_rows = [r for r in steps["rows"] if r["route"] == "good" and r["outcome"] == "ok"]
        if len(good_rows) != GOOD_TURNS:
            problems.append(f"{len(good_rows)} good records committed of {GOOD_TURNS}")
        for row in steps["rows"]:
            for column in ("prompt_tokens", "completion_tokens"):
                value = row[column]
                if value is not None and not 0 <= value <= 2**53:
                    problems.append(f"stored {column} = {value!r}")
        if steps["close_s"] > CLOSE_TIMEOUT + 1.0:
            problems.append(f"close() took {steps['close_s']:.1f} s")
    row = add_row(
        f"ledger:{scenario}",
        mode,
        problems,
        outcome=f"{len(outcomes)} turns, {len(steps.get('rows', []))} rows",
        elapsed=_slowest(outcomes),
        deadline=DEADLINE,
        bound=DEADLINE + SLACK,
        watched=watched,
    )
    assert row.ok, fail_message(row)


#: Records no database can store as they are (from any source: jaato, replayed traces).
REFUSED: dict[str, dict[str, Any]] = {
    "tokens_1e20": {"prompt_tokens": 10**20},
    "tokens_negative_1e20": {"completion_tokens": -(10**20)},
    "cost_inf": {"cost_usd": math.inf},
    "cost_nan": {"cost_usd": math.nan},
    "latency_inf": {"latency": math.inf},
}


def _record(i: int, **kw: Any) -> CallRecord:
    values: dict[str, Any] = {
        "time": time.time(),
        "turn_id": f"t-hostile-{i}",
        "agent_id": "main",
        "agent_type": "main",
        "route": "good",
        "provider": "127.0.0.1:1",
        "model": MODEL,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.0015,
        "latency": 0.1,
    }
    values.update(kw)
    return CallRecord(**values)


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_record_the_database_refuses_is_set_aside(tmp_path: Path, case: str) -> None:
    """The writer must not retry one refused record forever: the good ones after it commit."""
    ledger = Ledger.open(tmp_path / "ledger.sqlite", flush_interval=0.01, close_timeout=1.0)
    steps: dict[str, Any] = {}

    def flow() -> None:
        ledger.record(_record(0, **REFUSED[case]))
        for i in range(1, 4):
            ledger.record(_record(i))
        steps["flushed"] = ledger.flush(timeout=3.0)
        steps["rows"] = ledger.rows(flush=False)
        started = time.monotonic()
        ledger.close()
        steps["close_s"] = time.monotonic() - started

    watched = watch(flow, 15.0, name=f"hostile-ledger-{case}")
    problems = []
    if not watched.finished:
        problems.append(f"still running after 15 s: {sorted(steps)} done")
    elif watched.error is not None:
        problems.append(f"{type(watched.error).__name__}: {watched.error} [{tail(watched.error)}]")
    else:
        if not steps["flushed"]:
            problems.append("flush() gave up after 3 s: the writer is stuck on the refused record")
        good = [r for r in steps["rows"] if r["turn_id"] != "t-hostile-0"]
        if len(good) != 3:
            problems.append(f"{len(good)} of the 3 good records committed")
        if steps["close_s"] > 2.0:
            problems.append(f"close() took {steps['close_s']:.1f} s")
    if not watched.finished:
        ledger.close(timeout=0.5)
    row = add_row(
        f"ledger_record:{case}",
        "ledger",
        problems,
        outcome=f"{len(steps.get('rows', []))} rows",
        elapsed=None,
        deadline=None,
        bound=None,
        watched=watched,
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("mode", MODES)
def test_a_locked_ledger_never_holds_a_turn_past_its_deadline(
    hostile: Any, make_pipeline: Any, tmp_path: Path, mode: str
) -> None:
    """Another process holds the SQLite write lock; the queue is tiny: turns end in time,
    and once the lock is gone every record commits."""
    db = tmp_path / "ledger.sqlite"
    good, _ = _route(hostile, "good", "ok")
    pipeline = make_pipeline(
        routes=[good],
        stages={
            "ledger": {
                "path": str(db),
                "flush_interval": 0.05,
                "max_pending": 2,
                "busy_timeout": 0.2,
                "close_timeout": CLOSE_TIMEOUT,
            }
        },
    )
    ledger = pipeline.plugins.pm.get_plugin("ledger").ledger
    outcomes: list[TurnOutcome] = []
    steps: dict[str, Any] = {}
    locked_turns = 4

    def flow() -> None:
        run_turn(pipeline, mode, lambda: Turn.create("before the lock", timeout=DEADLINE))
        steps["schema"] = ledger.flush(timeout=3.0)
        lock = sqlite3.connect(db, isolation_level=None, timeout=0)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            for i in range(locked_turns):
                # Give the writer time to take the queue and get stuck on the lock, so
                # that the queue fills whatever the pace of the turns.
                time.sleep(0.15)
                outcomes.append(TurnOutcome(mode))
                run_turn(
                    pipeline,
                    mode,
                    lambda: Turn.create(f"locked {i}", timeout=DEADLINE),  # noqa: B023
                    outcome=outcomes[-1],
                )
        finally:
            lock.rollback()
            lock.close()
        steps["flushed"] = ledger.flush(timeout=5.0)
        steps["rows"] = ledger.rows(flush=False)
        pipeline.close()

    limit = (locked_turns + 1) * (DEADLINE + SLACK) + 3.0 + 5.0 + CLOSE_TIMEOUT + GRACE
    watched = watch(
        flow,
        limit,
        name=f"hostile-ledger-lock-{mode}",
        stuck=any_stuck(outcomes, DEADLINE + SLACK),
    )
    problems = _judge_all(outcomes, Expect(answer_is(ANSWER)))
    if not watched.finished:
        problems.append(f"the flow was given up on, still running: {sorted(steps)} done")
    elif watched.error is not None:
        problems.append(f"{type(watched.error).__name__}: {watched.error}")
    else:
        if not steps["flushed"]:
            problems.append("flush() gave up 5 s after the lock was released")
        if len(steps["rows"]) != locked_turns + 1:
            problems.append(f"{len(steps['rows'])} records committed of {locked_turns + 1}")
    row = add_row(
        "ledger:locked",
        mode,
        problems,
        outcome=f"{len(outcomes)} turns, {len(steps.get('rows', []))} rows",
        elapsed=_slowest(outcomes),
        deadline=DEADLINE,
        bound=DEADLINE + SLACK,
        watched=watched,
    )
    assert row.ok, fail_message(row)


# --------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------


def _budget_pipeline(make_pipeline: Any, routes: list[Route], recorder: Recorder) -> Any:
    return make_pipeline(
        routes=routes,
        plugins=[recorder],
        default_route=routes[-1].name,
        stages={
            "budget": {
                "daily_usd": LIMIT,
                "on_limit": "refuse",
                "default_completion_tokens": 16,
                "seed_from_ledger": False,
            }
        },
    )


def _spend_problems(pipeline: Any, recorder: Recorder) -> list[str]:
    problems = []
    spent = sum(r.cost_usd for r in recorder.records if math.isfinite(r.cost_usd))
    if spent > LIMIT + 1e-9:
        problems.append(f"records cost ${spent:.4f} against a ${LIMIT} limit")
    stage = pipeline.plugins.pm.get_plugin("budget")
    daily = next(s for s in stage.status() if s.rule == "budget:daily")
    if not math.isfinite(daily.spent_usd) or not 0 <= daily.spent_usd <= LIMIT + 1e-9:
        problems.append(f"the budget counts ${daily.spent_usd} spent against ${LIMIT}")
    return problems


def _budget_flow(
    case: str,
    mode: str,
    pipeline: Any,
    recorder: Recorder,
    turns: list[tuple[str, str]],
    expect_first: Expect,
) -> None:
    """Run ``turns`` ((route, prompt) pairs) in ``mode`` and judge spend against the limit."""
    outcomes: list[TurnOutcome] = []

    def flow() -> None:
        for route, prompt in turns:
            outcomes.append(TurnOutcome(mode))
            run_turn(
                pipeline,
                mode,
                lambda: Turn.create(prompt, timeout=DEADLINE, route=route),  # noqa: B023
                outcome=outcomes[-1],
            )

    limit = len(turns) * (DEADLINE + SLACK) + GRACE
    watched = watch(
        flow, limit, name=f"hostile-{case}-{mode}", stuck=any_stuck(outcomes, DEADLINE + SLACK)
    )
    problems = []
    if not watched.finished:
        problems.append("the flow was given up on, still running")
    problems += _judge_all(outcomes, expect_first)
    problems += record_problems(recorder.records)
    problems += _spend_problems(pipeline, recorder)
    answered = sum(1 for o in outcomes if o.result is not None and o.result.blocked is None)
    row = add_row(
        case,
        mode,
        problems,
        outcome=f"{answered}/{len(turns)} answered",
        elapsed=_slowest(outcomes),
        deadline=DEADLINE,
        bound=DEADLINE + SLACK,
        watched=watched,
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("mode", MODES)
def test_a_server_ignoring_the_cap_cannot_overspend(
    hostile: Any, make_pipeline: Any, mode: str
) -> None:
    """Every reply claims 5,000 completion tokens although the request allowed 16."""
    route, tag = _route(hostile, "hostile", "usage=completion_5000")
    recorder = Recorder()
    pipeline = _budget_pipeline(make_pipeline, [route], recorder)
    turns = [("hostile", f"question {i}") for i in range(10)]
    _budget_flow(
        "budget:completion_5000", mode, pipeline, recorder, turns, Expect(answer_or_budget_block)
    )
    caps = {r.get("max_tokens") for r in hostile.requests(tag)}
    assert caps <= {16}, f"requests went out without the budget's cap: {caps}"


@pytest.mark.parametrize("mode", MODES)
def test_negative_usage_creates_no_headroom(hostile: Any, make_pipeline: Any, mode: str) -> None:
    """Three replies with usage -100000 first, then 20 honest calls of $0.0015 each."""
    negative, _ = _route(hostile, "negative", "usage=negative")
    good, _ = _route(hostile, "good", "ok")
    recorder = Recorder()
    pipeline = _budget_pipeline(make_pipeline, [negative, good], recorder)
    turns = [("negative", f"negative {i}") for i in range(3)]
    turns += [("good", f"good {i}") for i in range(20)]
    _budget_flow(
        "budget:negative_usage", mode, pipeline, recorder, turns, Expect(answer_or_budget_block)
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("price", ["nan", "inf", "-1"])
def test_an_impossible_price_in_code_cannot_disable_the_budget(
    make_hostile: Any, price: str, mode: str
) -> None:
    """A route built in code (no config check) with a nan/inf/negative price, under a budget."""
    value = float(price)
    try:
        pipeline, recorder, _ = make_hostile(
            "ok",
            price=Price(input_per_1k=value, output_per_1k=value, source="test"),
            stages={"budget": {"daily_usd": LIMIT, "on_limit": "refuse"}},
        )
    except ConfigError as exc:  # refusing the route outright is right too
        add_row(
            f"price_in_code={price}",
            mode,
            [],
            outcome=f"ConfigError: {exc}"[:60],
            elapsed=None,
            deadline=None,
            bound=None,
        )
        return
    for i in range(3):
        row = check_case(
            f"price_in_code={price}",
            mode,
            pipeline,
            lambda: Turn.create(f"question {i}", timeout=DEADLINE),  # noqa: B023
            Expect(answer_or_budget_block),
            deadline=DEADLINE,
            recorder=recorder,
        )
        assert row.ok, fail_message(row)
    assert not _spend_problems(pipeline, recorder), _spend_problems(pipeline, recorder)


# --------------------------------------------------------------------------
# config: impossible figures are refused when read
# --------------------------------------------------------------------------

IMPOSSIBLE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -0.5}


def _config_row(case: str, problems: list[str], outcome: str) -> None:
    row = add_row(
        case, "config", problems, outcome=outcome, elapsed=None, deadline=None, bound=None
    )
    assert row.ok, fail_message(row)


@pytest.mark.parametrize("field", ["input_per_1k", "output_per_1k"])
@pytest.mark.parametrize("value", list(IMPOSSIBLE))
def test_an_impossible_price_is_refused_at_config_time(field: str, value: str) -> None:
    data = {
        "routes": {
            "hosted": {
                "base_url": "http://127.0.0.1:9/v1",
                "model": MODEL,
                "price": {field: IMPOSSIBLE[value]},
            }
        }
    }
    problems, outcome = _expect_config_error(lambda: Config.from_dict(data, env={}), "price")
    _config_row(f"config:price.{field}={value}", problems, outcome)


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "-1.0"])
def test_an_impossible_price_in_a_toml_file_is_refused(tmp_path: Path, literal: str) -> None:
    path = tmp_path / "nimpipe.toml"
    path.write_text(
        "[routes.hosted]\n"
        'base_url = "http://127.0.0.1:9/v1"\n'
        f'model = "{MODEL}"\n'
        f"price = {{ input_per_1k = {literal}, output_per_1k = 0.001 }}\n"
    )
    problems, outcome = _expect_config_error(lambda: Config.load(path, env={}), "price")
    _config_row(f"config:toml price={literal}", problems, outcome)


@pytest.mark.parametrize("key", ["daily_usd", "monthly_usd", "agent_daily_usd"])
@pytest.mark.parametrize("value", list(IMPOSSIBLE))
def test_an_impossible_budget_limit_is_refused(key: str, value: str) -> None:
    def create() -> None:
        config = Config.from_dict({"stages": {"budget": {key: IMPOSSIBLE[value]}}}, env={})
        route = Route(name="r", base_url="http://127.0.0.1:9/v1", model=MODEL, price=PRICE)
        Pipeline.create(config.with_routes(route, default="r"), entrypoints=False).close()

    problems, outcome = _expect_config_error(create, key)
    _config_row(f"config:budget.{key}={value}", problems, outcome)


def _expect_config_error(fn: Any, key_part: str) -> tuple[list[str], str]:
    try:
        fn()
    except ConfigError as exc:
        if key_part not in (exc.key or "") and key_part not in str(exc):
            return [f"ConfigError does not name {key_part!r}: {exc}"], "ConfigError"
        return [], "ConfigError"
    except Exception as exc:
        return [f"{type(exc).__name__} instead of ConfigError: {exc}"], type(exc).__name__
    return ["accepted"], "accepted"
