"""The cascade stage: cheap tier first, score the answer, escalate while it is poor, fail over."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimpipe import (
    Escalate,
    FinishReason,
    Message,
    Price,
    Response,
    Route,
    ToolCall,
    ToolSpec,
    Turn,
)
from nimpipe.errors import ConfigError
from nimpipe.testing.nim_server import NimServer
from nimpipe_contrib.routing.cascade import CascadeSettings
from nimpipe_contrib.routing.scorers import parse_rating, score_response

CHEAP = "meta/llama-3.1-8b-instruct"
FRONTIER = "meta/llama-3.1-405b-instruct"
GOOD_EXPLANATION = (
    "Photosynthesis is the process by which plants, algae and some bacteria turn light, "
    "water and carbon dioxide into glucose and oxygen, storing the energy of sunlight in "
    "chemical bonds inside their chloroplasts."
)
CHEAP_REPLIES = {
    "Rating (0-10)": "3",
    "refuse me": "I'm sorry, but I can't help with that request.",
    "say nothing": "",
    "explain photosynthesis": "Plants.",
    "truncate": " ".join(f"w{i}" for i in range(40)),
    "capital of France": "Paris is the capital of France.",
}
FRONTIER_REPLIES = {
    "explain photosynthesis": GOOD_EXPLANATION,
    "truncate": "A short, whole answer.",
}
FRONTIER_PRICE = Price(input_per_1k=0.0035, output_per_1k=0.0035, source="test")


@pytest.fixture(scope="module")
def server() -> Iterator[NimServer]:
    models = [
        {"id": CHEAP, "replies": CHEAP_REPLIES},
        {"id": FRONTIER, "replies": FRONTIER_REPLIES},
    ]
    with NimServer(models=models) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: NimServer) -> None:
    server.reset()


def cheap(server: NimServer, name: str = "local", **kw: Any) -> Route:
    return Route(name=name, base_url=server.base_url, model=CHEAP, self_hosted=True, tier=0, **kw)


def frontier(server: NimServer, **kw: Any) -> Route:
    return Route(
        name="frontier",
        base_url=server.base_url,
        model=FRONTIER,
        tier=1,
        price=FRONTIER_PRICE,
        **kw,
    )


def make(make_pipeline: Any, server: NimServer, tmp_path: Path, **cascade: Any) -> Any:
    # The frontier is listed (and is the default) first: the cascade still starts low.
    return make_pipeline(
        routes=[frontier(server), cheap(server)],
        stages={"cascade": cascade, "ledger": {"path": str(tmp_path / "l.sqlite")}},
    )


def calls_per_model(server: NimServer) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in server.requests:
        if request.path == "/v1/chat/completions":
            counts[request.body["model"]] = counts.get(request.body["model"], 0) + 1
    return counts


def ledger_rows(pipeline: Any) -> list[dict[str, Any]]:
    return pipeline.plugins.pm.get_plugin("ledger").ledger.rows()


# ----------------------------------------------------------------------
# escalation on the answer's quality
# ----------------------------------------------------------------------


def test_a_good_cheap_answer_stays_cheap(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)
    result = pipeline.run(Turn.create("hello there"))
    assert result.route.name == "local" and result.text == "NIM reply to: hello there"
    assert calls_per_model(server) == {CHEAP: 1}
    (decision,) = result.decisions
    assert decision.plugin == "cascade" and decision.reason == "passed 6 scorers on local"
    (row,) = ledger_rows(pipeline)
    assert row["routing_reason"] == "cascade: start on the cheapest lowest-tier route local"


@pytest.mark.parametrize(
    ("prompt", "scorer", "params"),
    [
        ("refuse me please", "refused", {}),
        ("say nothing at all", "empty", {}),
        ("explain photosynthesis", "too_short", {}),
        ("truncate nothing", "truncated", {"max_tokens": 20}),
    ],
)
def test_a_poor_cheap_answer_escalates(
    server: NimServer,
    make_pipeline: Any,
    tmp_path: Path,
    prompt: str,
    scorer: str,
    params: dict[str, Any],
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)
    result = pipeline.run(Turn.create(prompt, params=params))
    assert result.route.name == "frontier"
    assert calls_per_model(server) == {CHEAP: 1, FRONTIER: 1}
    escalate = result.decisions[0]
    assert isinstance(escalate, Escalate) and escalate.reason.startswith(f"{scorer}: ")
    assert escalate.score is not None and escalate.score < 0.5
    first, second = result.records
    assert (first.route, first.outcome) == ("local", "escalated")
    assert (second.route, second.outcome) == ("frontier", "ok")
    assert first.cost_usd == 0 and second.cost_usd > 0
    rows = ledger_rows(pipeline)
    assert rows[0]["reason"].startswith(f"cascade: {scorer}: ")
    assert rows[1]["routing_reason"].startswith(
        f"cascade: escalation to frontier (tier 1): {scorer}"
    )


def test_no_higher_tier_accepts_and_says_why(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make_pipeline(routes=[cheap(server)], stages={"cascade": {}})
    result = pipeline.run(Turn.create("refuse me"))
    assert result.route.name == "local" and result.text.startswith("I'm sorry")
    (decision,) = result.decisions
    assert decision.reason.endswith("but no higher tier is left")


def test_a_repeated_tool_call_loop_escalates(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)
    ask = 'call tool search {"q": "nimpipe"}'
    call = ToolCall(id="c", name="search", arguments='{"q":"nimpipe"}')
    history = [Message.user(ask)]
    for n in range(2):
        history += [Message.assistant(tool_calls=(call,)), Message.tool("c", f"result {n}")]
    turn = Turn.create([*history, Message.user(ask)], tools=[ToolSpec(name="search")])
    result = pipeline.run(turn)
    escalate = result.decisions[0]
    assert isinstance(escalate, Escalate) and escalate.reason.startswith("tool_loop: tool call")
    # the frontier proposes the same call: with no tier left it is accepted, saying why
    assert result.route.name == "frontier"
    assert result.decisions[-1].reason.endswith("but no higher tier is left")


def test_streamed_turns_show_only_the_accepted_answer(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)
    stream = pipeline.stream(Turn.create("explain photosynthesis"))
    assert stream.text() == GOOD_EXPLANATION
    assert stream.result is not None and stream.result.route.name == "frontier"


def test_the_cascade_works_under_arun(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)

    async def main() -> list[Any]:
        prompts = ["refuse me", "hello", "explain photosynthesis", "hi"] * 4
        return list(await asyncio.gather(*(pipeline.arun(Turn.create(p)) for p in prompts)))

    results = asyncio.run(main())
    routes = [r.route.name for r in results]
    assert routes == ["frontier", "local", "frontier", "local"] * 4


# ----------------------------------------------------------------------
# failover on errors and timeouts
# ----------------------------------------------------------------------


def test_failover_on_an_error(server: NimServer, make_pipeline: Any, tmp_path: Path) -> None:
    pipeline = make_pipeline(
        routes=[cheap(server, max_retries=0), frontier(server)], stages={"cascade": {}}
    )
    server.inject("status", status=500, model=CHEAP)
    result = pipeline.run(Turn.create("hello"))
    assert result.route.name == "frontier"
    escalate = result.decisions[0]
    assert isinstance(escalate, Escalate) and escalate.score is None
    assert escalate.reason.startswith("failover: unavailable on local: HTTP 500")
    assert [r.outcome for r in result.records] == ["error", "ok"]


def test_failover_on_a_timeout_prefers_a_replica(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make_pipeline(
        routes=[
            cheap(server, name="local-a", timeout=0.3, max_retries=0),
            cheap(server, name="local-b"),
            frontier(server),
        ],
        stages={"cascade": {}, "ledger": {"path": str(tmp_path / "l.sqlite")}},
    )
    server.inject("stall", stall_seconds=2, model=CHEAP)
    result = pipeline.run(Turn.create("hello"))
    assert result.route.name == "local-b"
    assert result.decisions[0].reason.startswith("failover: timeout on local-a")
    rows = ledger_rows(pipeline)
    assert rows[1]["routing_reason"].startswith("cascade: failover to local-b (tier 0)")


def test_failover_can_be_turned_off(server: NimServer, make_pipeline: Any) -> None:
    pipeline = make_pipeline(
        routes=[cheap(server, max_retries=0), frontier(server)],
        stages={"cascade": {"failover": False}},
    )
    server.inject("status", status=500, model=CHEAP)
    with pytest.raises(Exception, match="HTTP 500"):
        pipeline.run(Turn.create("hello"))


# ----------------------------------------------------------------------
# self-assessment: a second call rates the answer
# ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_self_assessment_escalates_a_low_rating(
    server: NimServer, make_pipeline: Any, tmp_path: Path, mode: str
) -> None:
    scorers = ["empty", "refused", "self_assessment"]
    pipeline = make(make_pipeline, server, tmp_path, scorers=scorers)
    turn = Turn.create("What is the capital of France?")
    result = pipeline.run(turn) if mode == "run" else asyncio.run(pipeline.arun(turn))
    assert result.route.name == "frontier"
    escalate = result.decisions[0]
    assert isinstance(escalate, Escalate) and escalate.score == 0.3
    assert escalate.reason == "self_assessment: rated 3/10 (score 0.30 < 0.50)"
    rows = ledger_rows(pipeline)
    # the rating call is a model call of its own, recorded like any other
    assert len(rows) == 3 and len({r["turn_id"] for r in rows}) == 2
    judge = next(r for r in rows if r["turn_id"] != turn.id)
    assert judge["route"] == "local" and judge["outcome"] == "ok"


# ----------------------------------------------------------------------
# scorers as functions
# ----------------------------------------------------------------------


def scores(text: str, question: str = "hi", **kw: Any) -> dict[str, float]:
    response = Response(text=text, **kw)
    return {s.scorer: s.value for s in score_response(Turn.create(question), response)}


def test_refusal_patterns() -> None:
    for text in (
        "I'm sorry, but I can't help with that.",
        "I am sorry, I cannot assist with this request.",
        "Sorry, I can't do that.",
        "I cannot help with that.",
        "As an AI language model, I have no opinions.",
    ):
        assert scores(text) == {"refused": 0.1}, text
    for text in (
        "Sorry for the delay! Here is the answer: 42.",
        "I can't believe how simple this is: the answer is 42.",
        "You cannot divide by zero, so the answer is undefined.",
    ):
        assert scores(text) == {}, text


def test_logprobs_and_other_scorers() -> None:
    confident = Response(text="Paris is the capital.", logprobs=(-0.1, -0.2, -0.05))
    unsure = Response(text="Maybe Lyon is the capital.", logprobs=(-2.5, -3.0, -1.9))
    turn = Turn.create("capital of France?")
    assert score_response(turn, confident) == []
    (low,) = score_response(turn, unsure)
    assert low.scorer == "logprobs" and low.detail == "mean token logprob -2.47 < -1.50"
    assert scores("", finish_reason=FinishReason.LENGTH) == {"empty": 0.0, "truncated": 0.2}
    assert scores("Plants.", "Explain photosynthesis") == {"too_short": 0.04}
    tool = Response(tool_calls=(ToolCall(id="x", name="t", arguments="{}"),))
    assert score_response(Turn.create("explain"), tool) == []
    assert parse_rating("Rating: 7/10") == 7 and parse_rating("10") == 10
    assert parse_rating("no idea") is None
    settings = CascadeSettings(scorers=("logprobs",))
    assert score_response(turn, Response(text=""), settings) == []


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"scorers": ["empty", "vibes"]}, "stages.cascade.scorers"),
        ({"threshold": 2}, "stages.cascade.threshold"),
        ({"refusal_patterns": ["("]}, "stages.cascade.refusal_patterns"),
        ({"start_high": True}, "stages.cascade.start_high"),
    ],
)
def test_bad_settings_name_the_key(make_pipeline: Any, settings: dict[str, Any], key: str) -> None:
    # A stage's bad setting reaches the caller as the ConfigError itself (exit 2).
    with pytest.raises(ConfigError) as info:
        make_pipeline(stages={"cascade": settings})
    assert info.value.key == key


def test_settings_reach_the_scorers(server: NimServer, make_pipeline: Any, tmp_path: Path) -> None:
    pipeline = make(
        make_pipeline,
        server,
        tmp_path,
        detailed_min_words=1,
        refusal_patterns=[r"^NIM reply to: hello"],
    )
    result = pipeline.run(Turn.create("explain photosynthesis"))
    assert result.route.name == "local"
    refused = pipeline.run(Turn.create("hello"))
    assert refused.route.name == "frontier"
    assert json.dumps(refused.decisions[0].reason).startswith('"refused: ')


def test_router_rules_first_then_the_cascade(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make_pipeline(
        routes=[frontier(server), cheap(server)],
        stages={
            "router": {"rules": [{"match": {"agent_type": "orchestrator"}, "route": "frontier"}]},
            "cascade": {},
            "ledger": {"path": str(tmp_path / "l.sqlite")},
        },
    )
    plan = pipeline.run(Turn.create("refuse me", agent_type="orchestrator"))
    sub = pipeline.run(Turn.create("refuse me", agent_type="explorer"))
    assert plan.route.name == "frontier" and len(plan.records) == 1
    assert sub.route.name == "frontier" and [r.route for r in sub.records] == ["local", "frontier"]
    rows = {(r["turn_id"], r["attempt"]): r["routing_reason"] for r in ledger_rows(pipeline)}
    assert rows[(plan.turn.id, 1)] == "router: rule 1 (agent type orchestrator) -> frontier"
    assert rows[(sub.turn.id, 1)] == "cascade: start on the cheapest lowest-tier route local"
    assert rows[(sub.turn.id, 2)].startswith("cascade: escalation to frontier (tier 1): refused")
